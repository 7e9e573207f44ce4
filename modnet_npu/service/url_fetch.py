"""Fetching an image from a URL a client named, without becoming a proxy into the server's network.

A matting service that fetches ``?url=`` for anyone is a server-side request
forgery tool unless every hop is checked: only ``http``/``https``; the host
name resolved once and every address checked against the loopback, private,
link-local, multicast, reserved and unspecified ranges; the connection made
to the checked address itself (the name is not resolved again, so a DNS answer
that changes between check and connect cannot slip through), with the
original name in the ``Host`` header and in TLS's SNI and certificate check;
redirects followed by hand, each one checked the same way; one deadline for
the whole fetch; and never more than ``max_bytes`` read.

The resolver is a parameter so that tests can check the address rules with
made-up answers, without sending traffic anywhere.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from modnet_npu.errors import ModnetError

# host, port -> the addresses it resolves to (strings, IPv4 or IPv6)
Resolver = Callable[[str, int], list[str]]

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


class UrlFetchError(ModnetError, ValueError):
    """A URL that cannot or must not be fetched; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    url: str  # the last URL, after redirects


def default_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for a TCP connection (the system's resolver)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlFetchError(f"cannot resolve {host}: {exc}", 502) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refusal(address: str, *, allow_private: bool = False) -> str | None:
    """Why ``address`` must not be connected to, or None when it may.

    ``allow_private`` admits loopback, private, link-local and reserved
    addresses (a service fetching from its own network on purpose); multicast
    and unspecified addresses are never a web server.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) names no other address
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "an unspecified address"
    if allow_private:
        return None
    for kind in ("loopback", "link_local", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:  # shared (100.64/10), documentation, 6to4 and the like
        return "not a public address"
    return None


def checked_address(host: str, port: int, *, allow_private: bool, resolver: Resolver) -> str:
    """The address to connect to for ``host``: every address it resolves to must pass :func:`refusal`.

    All of them, not only the first: a name that resolves to a public and a
    private address could be connected to the private one by another client.
    """
    try:
        addresses = [str(ipaddress.ip_address(host.split("%", 1)[0]))]
    except ValueError:
        addresses = resolver(host, port)
    if not addresses:
        raise UrlFetchError(f"cannot resolve {host}: no address", 502)
    for address in addresses:
        why = refusal(address, allow_private=allow_private)
        if why is not None:
            hint = "" if allow_private else " (start the server with --allow-private-urls to allow it)"
            named = host if host == address else f"{host} ({address})"
            raise UrlFetchError(f"url refused: {named} is {why}{hint}", 422)
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a checked address, with the URL's host name in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; SNI and the certificate check use the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float,
                 context: ssl.SSLContext | None = None) -> None:
        super().__init__(host, port, timeout=timeout, context=context or ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


def parse_url(url: str) -> _Target:
    """Scheme, host, port and path of ``url``; 422 for anything but a plain http(s) URL."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UrlFetchError(f"url {url!r} is not valid: {exc}", 422) from None
    if parts.scheme not in ("http", "https"):
        raise UrlFetchError(f"url {url!r}: only http and https URLs are fetched", 422)
    if not parts.hostname:
        raise UrlFetchError(f"url {url!r} names no host", 422)
    if parts.username or parts.password:
        raise UrlFetchError("url: credentials in URLs are not supported", 422)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path)


def _read_limited(response: http.client.HTTPResponse, sock: socket.socket | None, max_bytes: int,
                  deadline: float) -> bytes:
    """The body, refusing more than ``max_bytes`` and a server that drips it out past the deadline."""
    declared = response.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > max_bytes:
        raise UrlFetchError(f"url: the image is {int(declared)} bytes, over the limit of {max_bytes}", 413)
    chunks, total = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UrlFetchError("url: time-out while reading the image", 504)
        if sock is not None:
            sock.settimeout(remaining)  # each read waits at most what is left of the whole fetch
        chunk = response.read1(_CHUNK)  # one recv at most: the deadline is checked between them
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise UrlFetchError(f"url: the image is over the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)


def _one_hop(target: _Target, address: str, *, max_bytes: int, deadline: float,
             context: ssl.SSLContext | None) -> tuple[int, str | None, bytes, str]:
    """(status, Location, body, content type) of one GET; the body is read only for a 200."""
    timeout = max(0.001, deadline - time.monotonic())
    if target.scheme == "https":
        conn: http.client.HTTPConnection = _PinnedHTTPS(target.host, target.port, address, timeout, context)
    else:
        conn = _PinnedHTTP(target.host, target.port, address, timeout)
    try:
        conn.request("GET", target.path, headers={"Accept": "image/*", "User-Agent": "modnet-serve"})
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b"", ""
        body = _read_limited(response, conn.sock, max_bytes, deadline)
        return 200, None, body, response.getheader("Content-Type", "")
    finally:
        conn.close()


def fetch(url: str, *, max_bytes: int, timeout: float, allow_private: bool = False,
          resolver: Resolver = default_resolver, max_redirects: int = MAX_REDIRECTS,
          context: ssl.SSLContext | None = None) -> Fetched:
    """The bytes at ``url``, every hop checked (module docstring); UrlFetchError with the status to answer."""
    deadline = time.monotonic() + timeout
    current = url
    for _hop in range(max_redirects + 1):
        target = parse_url(current)
        address = checked_address(target.host, target.port, allow_private=allow_private, resolver=resolver)
        try:
            status, location, body, ctype = _one_hop(target, address, max_bytes=max_bytes, deadline=deadline,
                                                     context=context)
        except TimeoutError:  # socket.timeout is TimeoutError since 3.10
            raise UrlFetchError(f"url: time-out after {timeout:g} s fetching {target.host}", 504) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = str(exc) or type(exc).__name__
            raise UrlFetchError(f"url: cannot fetch from {target.host}: {reason}", 502) from None
        if status == 200:
            return Fetched(body, ctype, current)
        if status in REDIRECTS and location:
            current = urllib.parse.urljoin(current, location)
            continue
        raise UrlFetchError(f"url: {target.host} answered HTTP {status}", 502)
    raise UrlFetchError(f"url: more than {max_redirects} redirects", 502)
