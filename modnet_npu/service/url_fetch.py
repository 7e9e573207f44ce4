"""Fetching an image from a URL a client named, without becoming a proxy into the server's network.

A matting service that fetches ``?url=`` for anyone is a server-side request
forgery tool unless every hop is checked: only ``http``/``https``; the host
name resolved once and every address checked against the loopback, private,
link-local, multicast, reserved and unspecified ranges; the connection made
to the checked address itself (the name is not resolved again, so a DNS answer
that changes between check and connect cannot slip through), with the
original name in the ``Host`` header and in TLS's SNI and certificate check;
redirects followed by hand, each one checked the same way; one deadline for
the whole fetch; and never more than ``max_bytes`` read. Credentials in the URL
(``http://user:pass@host/``) are sent as HTTP Basic authentication, to that URL's
host only (a redirect elsewhere does not carry them), as curl and rembg's
aiohttp do.

Failures are :class:`UrlFetchError` with the status the service answers;
:class:`UrlRejected`, a subclass, is what the asker must change — a URL that is
invalid or refused, a name that does not resolve, redirects without a
``Location`` or past the limit, an image over the byte limit — told apart from a
source that fails (unreachable, an HTTP error, too slow). rembg answers the
former 400 (``rembg_compat``).

The resolver is a parameter so that tests can check the address rules with
made-up answers, without sending traffic anywhere.
"""
from __future__ import annotations

import base64
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from modnet_npu.errors import ModnetError
from modnet_npu.service.limits import clip, shown

# host, port -> the addresses it resolves to (strings, IPv4 or IPv6)
Resolver = Callable[[str, int], list[str]]

MAX_REDIRECTS = 4  # rembg 2.0.86 follows 4 (five requests in all): a 5th is refused there as here
REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


class UrlFetchError(ModnetError, ValueError):
    """A URL that cannot or must not be fetched; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class UrlRejected(UrlFetchError):
    """The URL (or a redirect) names nothing this server fetches, or its image is over the byte limit:
    the asker's to change, not the source's failure (module docstring)."""


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
        raise UrlRejected(f"cannot resolve {host}: {exc}", 502) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 (SIIT)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated, still routed by some stacks


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, each with its kind (6to4, Teredo, NAT64 ...).

    A host reachable at such an address is, through a relay or translator, the
    IPv4 host it embeds: ``2002:7f00:1::1`` is 127.0.0.1 behind a 6to4 relay.
    """
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        found.append(("an IPv4-mapped", ip.ipv4_mapped))
    if ip.sixtofour is not None:
        found.append(("a 6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("a Teredo", client), ("a Teredo", server)]
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in _NAT64):
        found.append(("a NAT64", low32))
    elif ip in _IPV4_TRANSLATED:
        found.append(("an IPv4-translated", low32))
    elif ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves
        found.append(("an IPv4-compatible", low32))
    return found


def refusal(address: str, *, allow_private: bool = False) -> str | None:
    """Why ``address`` must not be connected to, or None when it may.

    ``allow_private`` admits loopback, private, link-local and reserved
    addresses (a service fetching from its own network on purpose); multicast
    and unspecified addresses are never a web server. An IPv6 address that
    embeds an IPv4 one (IPv4-mapped, 6to4, Teredo, NAT64 ...) is judged by the
    IPv4 address too; NAT64 of a public IPv4 address is how IPv6-only networks
    reach IPv4 sites, and passes.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) names no other address
    if ip.version == 6:
        embedded = embedded_ipv4(ip)
        for kind, v4 in embedded:
            why = refusal(str(v4), allow_private=allow_private)
            if why is not None:
                return f"{kind} address of {v4}, {why}"
        if embedded and embedded[0][0] in ("an IPv4-mapped", "a NAT64"):
            return None  # the IPv4 address it stands for passed
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "an unspecified address"
    if allow_private:
        return None
    for kind in ("loopback", "link_local", "site_local", "reserved", "private"):
        if getattr(ip, f"is_{kind}", False):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:  # shared (100.64/10), documentation and the like
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
        raise UrlRejected(f"cannot resolve {host}: no address", 502)
    for address in addresses:
        why = refusal(address, allow_private=allow_private)
        if why is not None:
            hint = "" if allow_private else " (start the server with --allow-private-urls to allow it)"
            named = host if host == address else f"{host} ({address})"
            raise UrlRejected(f"url refused: {named} is {why}{hint}", 422)
    return addresses[0]


class FetchControl:
    """One fetch's kill switch: :meth:`abort` shuts its connection down from any thread.

    A blocked ``recv`` returns at once when its socket is shut down, so a fetch
    ends at its deadline however the remote server paces its status line,
    headers or body, and as soon as whoever asked for it gives up (the client
    went, the server stops). Name resolution is the one step it cannot cut
    short: it is checked right after.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.reason: str | None = None  # "time-out", "shutdown" or "cancelled" once aborted

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            aborted = self.reason is not None
        if aborted:
            _shut(sock)

    def abort(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def check(self, timeout: float, host: str) -> None:
        """UrlFetchError when aborted: 504 at the deadline, 503 at shutdown, 499 when the asker gave up."""
        if self.reason == "time-out":
            raise UrlFetchError(f"url: time-out after {timeout:g} s fetching {host}", 504)
        if self.reason == "shutdown":
            raise UrlFetchError("url: fetch stopped: the server is shutting down", 503)
        if self.reason is not None:
            raise UrlFetchError("url: fetch cancelled (the request was given up)", 499)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected yet, or already closed
        pass


def _connect(address: str, port: int, timeout: float, control: FetchControl) -> socket.socket:
    sock = socket.create_connection((address, port), timeout)
    control.attach(sock)
    return sock


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a checked address, with the URL's host name in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float, control: FetchControl) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.control = control

    def connect(self) -> None:
        self.sock = _connect(self.address, self.port, self.timeout, self.control)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; SNI and the certificate check use the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, control: FetchControl,
                 context: ssl.SSLContext | None = None) -> None:
        super().__init__(host, port, timeout=timeout, context=context or ssl.create_default_context())
        self.address = address
        self.control = control

    def connect(self) -> None:
        sock = _connect(self.address, self.port, self.timeout, self.control)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str
    authorization: str | None = None  # HTTP Basic, from the URL's user:password


def _basic(user: str | None, password: str | None) -> str | None:
    if not user and not password:  # none given (or an empty "@")
        return None
    pair = f"{urllib.parse.unquote(user or '')}:{urllib.parse.unquote(password or '')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def parse_url(url: str) -> _Target:
    """Scheme, host, port, path and credentials of ``url``; UrlRejected (422) for anything but an http(s) URL."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UrlRejected(f"url {shown(url)} is not valid: {exc}", 422) from None
    if parts.scheme not in ("http", "https"):
        raise UrlRejected(f"url {shown(url)}: only http and https URLs are fetched", 422)
    if not parts.hostname:
        raise UrlRejected(f"url {shown(url)} names no host", 422)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path,
                   _basic(parts.username, parts.password))


def _read_limited(response: http.client.HTTPResponse, sock: socket.socket | None, max_bytes: int,
                  deadline: float) -> bytes:
    """The body, refusing more than ``max_bytes`` and a server that drips it out past the deadline."""
    declared = response.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > max_bytes:
        raise UrlRejected(f"url: the image is {int(declared)} bytes, over the limit of {max_bytes}", 413)
    chunks, total = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if sock is not None:
            sock.settimeout(remaining)  # each read waits at most what is left of the whole fetch
        chunk = response.read1(_CHUNK)  # one recv at most: the deadline is checked between them
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise UrlRejected(f"url: the image is over the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)


def _one_hop(target: _Target, address: str, *, max_bytes: int, deadline: float, control: FetchControl,
             context: ssl.SSLContext | None) -> tuple[int, str | None, bytes, str]:
    """(status, Location, body, content type) of one GET; the body is read only for a 200."""
    timeout = max(0.001, deadline - time.monotonic())
    if target.scheme == "https":
        conn: http.client.HTTPConnection = _PinnedHTTPS(target.host, target.port, address, timeout, control,
                                                        context)
    else:
        conn = _PinnedHTTP(target.host, target.port, address, timeout, control)
    try:
        headers = {"Accept": "image/*", "User-Agent": "modnet-serve"}
        if target.authorization:
            headers["Authorization"] = target.authorization
        conn.request("GET", target.path, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b"", ""
        body = _read_limited(response, conn.sock, max_bytes, deadline)
        return 200, None, body, response.getheader("Content-Type", "")
    finally:
        conn.close()


def fetch(url: str, *, max_bytes: int, timeout: float, allow_private: bool = False,
          resolver: Resolver = default_resolver, max_redirects: int = MAX_REDIRECTS,
          context: ssl.SSLContext | None = None, control: FetchControl | None = None) -> Fetched:
    """The bytes at ``url``, every hop checked (module docstring); UrlFetchError with the status to answer.

    One deadline, ``timeout`` seconds, covers the whole fetch: connecting,
    the status line, the headers and the body of every hop. ``control`` lets
    another thread cancel it (:meth:`FetchControl.abort`).
    """
    control = control or FetchControl()
    watchdog = threading.Timer(timeout, control.abort, args=("time-out",))
    watchdog.daemon = True
    watchdog.start()
    try:
        return _fetch(url, max_bytes=max_bytes, timeout=timeout, allow_private=allow_private, resolver=resolver,
                      max_redirects=max_redirects, context=context, control=control)
    finally:
        watchdog.cancel()


def _fetch(url: str, *, max_bytes: int, timeout: float, allow_private: bool, resolver: Resolver,
           max_redirects: int, context: ssl.SSLContext | None, control: FetchControl) -> Fetched:
    deadline = time.monotonic() + timeout
    current = url
    for _hop in range(max_redirects + 1):
        target = parse_url(current)
        address = checked_address(target.host, target.port, allow_private=allow_private, resolver=resolver)
        control.check(timeout, target.host)  # resolving cannot be cut short: the deadline may have passed
        try:
            status, location, body, ctype = _one_hop(target, address, max_bytes=max_bytes, deadline=deadline,
                                                     control=control, context=context)
        except TimeoutError:  # socket.timeout is TimeoutError since 3.10
            control.abort("time-out")
            control.check(timeout, target.host)
            raise  # not reached: check raised
        except (OSError, http.client.HTTPException) as exc:
            control.check(timeout, target.host)  # a connection shut down by abort() fails in its own words
            reason = clip(str(exc) or type(exc).__name__, 120)
            raise UrlFetchError(f"url: cannot fetch from {target.host}: {reason}", 502) from None
        control.check(timeout, target.host)  # a body cut short by abort() reads as complete
        if status == 200:
            return Fetched(body, ctype, current)
        if status in REDIRECTS:
            if not location:
                raise UrlRejected(f"url: {target.host} answered HTTP {status} without a Location", 502)
            # a relative Location keeps the URL's host and credentials; an absolute one carries its own
            current = urllib.parse.urljoin(current, location)
            continue
        raise UrlFetchError(f"url: {target.host} answered HTTP {status}", 502)
    raise UrlRejected(f"url: more than {max_redirects} redirects", 502)
