"""url_fetch: the address rules on made-up resolver answers (no traffic anywhere), then real
fetches from an HTTP server on 127.0.0.1 only (allowed explicitly with allow_private)."""
from __future__ import annotations

import base64
import http.server
import io
import time

import pytest

from modnet_npu.service import url_fetch
from modnet_npu.service.url_fetch import UrlFetchError, UrlRejected, checked_address, fetch, parse_url, refusal
from conftest import loopback_http

# --------------------------------------------------------------------------
# the address check, with a stubbed resolver
# --------------------------------------------------------------------------

REFUSED = {
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "::1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "172.31.255.254": "private",
    "192.168.1.1": "private",
    "fc00::1": "private",
    "169.254.169.254": "link-local",  # the cloud metadata service
    "fe80::1": "link-local",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "240.0.0.1": "reserved",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped IPv6 is the IPv4 address
    "::ffff:10.0.0.1": "private",
    "100.64.0.1": "not a public address",  # carrier-grade NAT
    # IPv6 addresses that carry an IPv4 one are judged by it too
    "2002:7f00:1::1": "6to4 address of 127.0.0.1, a loopback",
    "2002:a00:1::1": "6to4 address of 10.0.0.1, a private",
    "2002:a9fe:a9fe::1": "6to4 address of 169.254.169.254, a link-local",
    "64:ff9b::7f00:1": "NAT64 address of 127.0.0.1, a loopback",
    "64:ff9b:1::a00:1": "NAT64 address of 10.0.0.1, a private",
    "2001:0:4136:e378:8000:63bf:80ff:fffe": "Teredo address of 127.0.0.1, a loopback",
    "::127.0.0.1": "IPv4-compatible address of 127.0.0.1, a loopback",
    "::ffff:0:7f00:1": "IPv4-translated address of 127.0.0.1, a loopback",
    "::ffff:0.0.0.0": "unspecified",
    "fec0::1": "site-local",
}
# the last three: 6to4 and NAT64 of public IPv4 addresses are how IPv6-only hosts reach IPv4 sites
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1",
          "64:ff9b::808:808"]


@pytest.mark.parametrize("address,kind", sorted(REFUSED.items()))
def test_refusal_names_the_range(address, kind):
    assert kind in refusal(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert refusal(address) is None


def test_allow_private_admits_private_ranges_but_never_multicast_or_unspecified():
    for address in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "fe80::1", "::1", "2002:7f00:1::1"):
        assert refusal(address, allow_private=True) is None
    assert "multicast" in refusal("224.0.0.1", allow_private=True)
    assert "unspecified" in refusal("0.0.0.0", allow_private=True)


class StubResolver:
    """Answers from a table and records every question; no network."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        return self.table[host]


def test_a_name_is_checked_on_every_address_it_resolves_to():
    resolver = StubResolver({"images.example": ["93.184.216.34"], "rebind.example": ["93.184.216.34", "10.0.0.7"],
                             "meta.example": ["169.254.169.254"]})
    assert checked_address("images.example", 443, allow_private=False, resolver=resolver) == "93.184.216.34"
    assert resolver.asked == [("images.example", 443)]
    with pytest.raises(UrlRejected) as err:
        checked_address("rebind.example", 80, allow_private=False, resolver=resolver)
    assert err.value.status == 422 and "10.0.0.7" in str(err.value) and "private" in str(err.value)
    with pytest.raises(UrlFetchError, match="link-local.*--allow-private-urls"):
        checked_address("meta.example", 80, allow_private=False, resolver=resolver)


def test_address_literals_are_not_resolved():
    resolver = StubResolver({})
    with pytest.raises(UrlFetchError, match="loopback"):
        checked_address("127.0.0.1", 80, allow_private=False, resolver=resolver)
    with pytest.raises(UrlFetchError, match="link-local"):
        checked_address("fe80::1%eth0", 80, allow_private=False, resolver=resolver)
    assert checked_address("8.8.8.8", 80, allow_private=False, resolver=resolver) == "8.8.8.8"
    assert resolver.asked == []


def test_a_name_that_resolves_to_nothing_is_a_502():
    with pytest.raises(UrlRejected) as err:  # the asker's to fix (rembg answers 400)
        checked_address("void.example", 80, allow_private=False, resolver=StubResolver({"void.example": []}))
    assert err.value.status == 502


@pytest.mark.parametrize("url,message", [
    ("ftp://example.com/a.png", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://example.com/", "only http and https"),
    ("http:///nohost.png", "names no host"),
    ("http://example.com:99999/a.png", "not valid"),
    ("", "only http and https"),
])
def test_only_plain_http_urls(url, message):
    with pytest.raises(UrlRejected, match=message) as err:
        parse_url(url)
    assert err.value.status == 422


def test_credentials_in_a_url_become_basic_authentication():
    assert parse_url("http://example.com/a.png").authorization is None
    target = parse_url("http://us%40er:p%3Ass@example.com/a.png")
    assert target.host == "example.com" and target.path == "/a.png"
    assert target.authorization == "Basic " + base64.b64encode(b"us@er:p:ss").decode()


def test_fetch_refuses_before_connecting():
    """Refused addresses never reach a connection: the resolver's answer is the last step."""
    resolver = StubResolver({"intranet.example": ["192.168.0.10"]})
    with pytest.raises(UrlFetchError, match="private") as err:
        fetch("http://intranet.example/cat.png", max_bytes=1000, timeout=2, resolver=resolver)
    assert err.value.status == 422


# --------------------------------------------------------------------------
# real fetches, from a server on 127.0.0.1
# --------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 2000  # the fetcher does not decode; any bytes will do


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[tuple[str, str]] = []
    authorizations: list[str | None] = []

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.hits.append((self.path, self.headers.get("Host", "")))
        self.authorizations.append(self.headers.get("Authorization"))
        route = self.path.split("?")[0]
        if route == "/image.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif route.startswith("/hop/"):
            left = int(route.rsplit("/", 1)[1])
            target = "/image.png" if left == 0 else f"/hop/{left - 1}"
            self._send(302, b"", {"Location": target})
        elif route == "/to":
            self._send(301, b"", {"Location": self.path.split("?to=", 1)[1]})
        elif route == "/nowhere":
            self._send(302, b"", {})
        elif route == "/big":
            self._send(200, b"y" * 5000, {"Content-Type": "image/png"})
        elif route == "/big-chunked":
            self._chunked(b"z" * 1000, 6)
        elif route == "/slow":
            self._drip()
        elif route == "/slow-status":
            self._drip_status()
        else:
            self._send(404, b"no", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunked(self, chunk: bytes, count: int) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(count):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def _drip_status(self) -> None:
        """The status line a byte every 0.1 s, then headers the same way: no body is ever reached."""
        try:
            for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"z" * 400:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # cut off, as it should be

    def _drip(self) -> None:
        """One byte every 0.2 s: each read is quick, the whole is not (a per-read time-out would never fire)."""
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass  # the client gave up, as it should


@pytest.fixture(scope="module")
def local_server():
    with loopback_http(_Handler) as server:
        yield server.server_address[1]


def _get(url: str, **kw) -> url_fetch.Fetched:
    kw.setdefault("max_bytes", 4000)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("allow_private", True)
    return fetch(url, **kw)


def test_fetch_connects_to_the_checked_address_with_the_original_host_name(local_server):
    resolver = StubResolver({"images.example": ["127.0.0.1"]})
    _Handler.hits.clear()
    got = _get(f"http://images.example:{local_server}/image.png", resolver=resolver)
    assert got.data == PNG and got.content_type == "image/png"
    assert resolver.asked == [("images.example", local_server)]  # resolved once, then pinned
    assert _Handler.hits == [("/image.png", f"images.example:{local_server}")]


def test_loopback_is_refused_without_allow_private(local_server):
    _Handler.hits.clear()
    with pytest.raises(UrlFetchError, match="loopback") as err:
        _get(f"http://127.0.0.1:{local_server}/image.png", allow_private=False)
    assert err.value.status == 422
    assert _Handler.hits == []  # never contacted


def test_redirects_are_followed_by_hand_up_to_four_as_rembg_does(local_server):
    got = _get(f"http://127.0.0.1:{local_server}/hop/3")  # 4 redirects, then the image
    assert got.data == PNG and got.url.endswith("/image.png")
    with pytest.raises(UrlRejected, match="more than 4 redirects") as err:
        _get(f"http://127.0.0.1:{local_server}/hop/4")
    assert err.value.status == 502
    with pytest.raises(UrlRejected, match="HTTP 302 without a Location") as err:
        _get(f"http://127.0.0.1:{local_server}/nowhere")
    assert err.value.status == 502


def test_credentials_go_to_their_own_host_only(local_server):
    _Handler.authorizations.clear()
    got = _get(f"http://me:pw@127.0.0.1:{local_server}/hop/1")  # relative redirects: the same host
    assert got.data == PNG
    assert _Handler.authorizations == ["Basic " + base64.b64encode(b"me:pw").decode()] * 3
    _Handler.authorizations.clear()
    _get(f"http://me:pw@127.0.0.1:{local_server}/to?to=http://127.0.0.1:{local_server}/image.png")
    assert _Handler.authorizations[1:] == [None]  # an absolute Location carries its own (none)


def test_each_redirect_is_checked_again(local_server):
    base = f"http://127.0.0.1:{local_server}"
    with pytest.raises(UrlFetchError, match="only http and https"):
        _get(f"{base}/to?to=file:///etc/passwd")
    _Handler.hits.clear()
    with pytest.raises(UrlFetchError, match="multicast"):  # refused even with allow_private
        _get(f"{base}/to?to=http://224.0.0.1/x.png")
    resolver = StubResolver({"next.example": ["127.0.0.1", "0.0.0.0"]})
    with pytest.raises(UrlFetchError, match="unspecified"):
        _get(f"{base}/to?to=http://next.example:{local_server}/image.png", resolver=resolver)
    assert resolver.asked == [("next.example", local_server)]
    assert [path for path, _ in _Handler.hits] == ["/to?to=http://224.0.0.1/x.png",
                                                   f"/to?to=http://next.example:{local_server}/image.png"]


def test_byte_limit_declared_and_streamed(local_server):
    base = f"http://127.0.0.1:{local_server}"
    with pytest.raises(UrlRejected, match="5000 bytes, over the limit of 4000") as err:
        _get(f"{base}/big")
    assert err.value.status == 413
    with pytest.raises(UrlRejected, match="over the limit of 4000") as err:
        _get(f"{base}/big-chunked")  # no Content-Length: counted while reading
    assert err.value.status == 413
    assert len(_get(f"{base}/big-chunked", max_bytes=6000).data) == 6000


def test_one_deadline_for_the_whole_fetch(local_server):
    start = time.monotonic()
    with pytest.raises(UrlFetchError, match="time-out") as err:
        _get(f"http://127.0.0.1:{local_server}/slow", timeout=0.8)
    assert err.value.status == 504
    assert time.monotonic() - start < 3.0  # not 100 x 0.2 s


def test_one_deadline_also_covers_the_status_line_and_headers(local_server):
    start = time.monotonic()
    with pytest.raises(UrlFetchError, match="time-out after 0.8 s") as err:
        _get(f"http://127.0.0.1:{local_server}/slow-status", timeout=0.8)
    assert err.value.status == 504
    assert time.monotonic() - start < 3.0  # each byte came within any per-read time-out; the whole did not


def test_a_fetch_is_cancelled_from_another_thread(local_server):
    import threading

    control = url_fetch.FetchControl()
    threading.Timer(0.3, control.abort).start()
    start = time.monotonic()
    with pytest.raises(UrlFetchError, match="cancelled") as err:
        _get(f"http://127.0.0.1:{local_server}/slow", timeout=20, control=control)
    assert err.value.status == 499 and time.monotonic() - start < 2.0


def test_upstream_errors_are_502(local_server):
    with pytest.raises(UrlFetchError, match="HTTP 404") as err:
        _get(f"http://127.0.0.1:{local_server}/missing.png")
    assert err.value.status == 502 and not isinstance(err.value, UrlRejected)  # the source's failure
    free = _free_port()
    with pytest.raises(UrlFetchError, match="cannot fetch") as err:
        _get(f"http://127.0.0.1:{free}/image.png")
    assert err.value.status == 502 and not isinstance(err.value, UrlRejected)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_messages_are_one_line():
    buf = io.StringIO()
    for url in ("ftp://x/", "http://127.0.0.1/"):
        try:
            fetch(url, max_bytes=10, timeout=1)
        except UrlFetchError as exc:
            buf.write(str(exc) + "\n")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and all(lines)
