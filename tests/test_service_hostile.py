"""The service under hostile clients: each attack family against a real ``serve.py`` on 127.0.0.1.

One server (ONNX Runtime, the generated model from ``conftest.flavour_files``,
tight limits so that each deadline passes in a second or two), run under a
memory cap (``RLIMIT_AS``) and a file-descriptor cap (``RLIMIT_NOFILE``). The
attackers connect from other loopback addresses (127.0.0.2 ...), as distinct
clients would; the well-behaved client is 127.0.0.1. During every attack,
``/healthz`` answers 200 and a normal request gets its matte.

Families: connections opened and held silent; more connections than one
client may hold; more than the server holds in all (only /healthz is still
answered); request headers sent one byte at a time; headers with a
Content-Length and no body; a ``url=`` whose server sends its status line
slowly (with the client leaving mid-fetch, and with SIGTERM mid-fetch); a model
size over ``--max-model-pixels``; a multipart body of 365,000 parts; a 19 MB
parameter value.
"""
from __future__ import annotations

import contextlib
import http.server
import io
import resource
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import loopback_http
from modnet_npu.service.child import ServerProcess

pytestmark = pytest.mark.slow

MEMORY_CAP = 6 << 30  # address space: the service's worst case at these limits is far below (module docstring)
FILES_CAP = 256
LIMITS = {"keep_alive": 1.0, "header_timeout": 1.5, "body_timeout": 1.5, "url_timeout": 4.0,
          "max_connections": 24, "per_client": 8, "max_queue": 4, "max_model_mp": 0.3}


def _png(height: int = 48, width: int = 40) -> bytes:
    rng = np.random.default_rng(height * width)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(flavour_files, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    args = ["--model", flavour_files["official"], "--backend", "ort", "--threads", "1", "--size", "64",
            "--io-threads", "2", "--batch-window-ms", "0", "--allow-private-urls",
            "--keep-alive", str(LIMITS["keep_alive"]), "--header-timeout", str(LIMITS["header_timeout"]),
            "--body-timeout", str(LIMITS["body_timeout"]), "--url-timeout", str(LIMITS["url_timeout"]),
            "--max-connections", str(LIMITS["max_connections"]),
            "--max-connections-per-client", str(LIMITS["per_client"]), "--max-queue", str(LIMITS["max_queue"]),
            "--max-bytes", "20", "--max-pixels", "4", "--max-model-pixels", str(LIMITS["max_model_mp"])]
    rlimits = {resource.RLIMIT_AS: (MEMORY_CAP, MEMORY_CAP), resource.RLIMIT_NOFILE: (FILES_CAP, FILES_CAP)}
    with ServerProcess(args, log_path=str(log), rlimits=rlimits, env={"MALLOC_ARENA_MAX": "2"},
                       start_timeout=120) as proc:
        yield proc
    assert proc.proc.returncode == -signal.SIGTERM, proc.log()[-2000:]
    assert "Traceback" not in proc.log(), proc.log()[-3000:]


def _port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _connect(server, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(server)), timeout=5, source_address=(source, 0))


def _normal(server) -> None:
    """What a well-behaved client sees: /healthz 200, and a matte."""
    with httpx.Client(base_url=server.url, timeout=20) as c:
        assert c.get("/healthz").status_code == 200
        r = c.post("/api/matte", params={"mode": "matte"}, files={"file": ("p.png", _png())})
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).size == (40, 48)


def _info(server) -> dict:
    with httpx.Client(base_url=server.url, timeout=20) as c:
        return c.get("/api/info").json()


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds``, and what it sent first."""
    sock.settimeout(seconds)
    got = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except ConnectionResetError:
        return True, got
    except (TimeoutError, socket.timeout):
        return False, got


def _wait_until_quiet(server, timeout: float = 10.0) -> None:
    """Until the attackers' connections are gone (only the one asking is open)."""
    deadline = time.monotonic() + timeout
    while _info(server)["connections"]["open"] > 1:
        assert time.monotonic() < deadline, _info(server)["connections"]
        time.sleep(0.1)


def test_connections_held_silent_are_closed_after_the_keep_alive(server):
    held = [_connect(server, "127.0.0.2") for _ in range(LIMITS["per_client"])]
    try:
        time.sleep(0.2)
        _normal(server)
        start = time.monotonic()
        for sock in held:
            closed, _ = _closed_within(sock, 5)
            assert closed
        # the keep-alive (1 s), not for ever (uvicorn alone never closes them)
        assert time.monotonic() - start < LIMITS["keep_alive"] + 2.0
    finally:
        for sock in held:
            sock.close()
    _wait_until_quiet(server)


def test_a_client_over_its_own_cap_is_refused_at_once(server):
    held = [_connect(server, "127.0.0.3") for _ in range(LIMITS["per_client"])]
    try:
        time.sleep(0.2)
        extra = _connect(server, "127.0.0.3")
        closed, sent = _closed_within(extra, 2)
        extra.close()
        assert closed and sent.startswith(b"HTTP/1.1 503 ") and b"too many connections" in sent
        _normal(server)  # another client is not affected
    finally:
        for sock in held:
            sock.close()
    _wait_until_quiet(server)
    assert _info(server)["connections"]["refused"] >= 1


def _sources(count: int) -> list[str]:
    """``count`` connections' source addresses, as many per address as the per-client cap allows."""
    return [f"127.0.0.{10 + i // LIMITS['per_client']}" for i in range(count)]


def test_silent_connections_from_many_addresses_give_way_to_newcomers(server):
    held = [_connect(server, source) for source in _sources(LIMITS["max_connections"] + 8)]
    try:
        time.sleep(0.3)
        _normal(server)  # the server is full of idle connections: the longest-waiting ones are closed for it
        assert _info(server)["connections"]["closed"].get("evicted", 0) >= 1
    finally:
        for sock in held:
            sock.close()
    _wait_until_quiet(server)


def test_a_server_full_of_requests_still_answers_healthz_and_refuses_the_rest_quickly(server, slow_source):
    held = []
    for source in _sources(LIMITS["max_connections"]):  # each with a request in progress for the url deadline
        sock = _connect(server, source)
        sock.sendall(b"GET /api/matte?url=" + slow_source.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        held.append(sock)
    try:
        time.sleep(0.3)
        with httpx.Client(base_url=server.url, timeout=5) as c:
            assert c.get("/healthz").status_code == 200  # the /healthz reserve
        with httpx.Client(base_url=server.url, timeout=5) as c:
            start = time.monotonic()
            r = c.post("/api/matte", files={"file": ("p.png", _png())})
            assert r.status_code == 503 and "too many connections" in r.json()["detail"]
            assert time.monotonic() - start < 2.0 and r.headers["Retry-After"] == "1"
    finally:
        for sock in held:
            sock.close()
    _wait_until_quiet(server)
    _normal(server)


def test_slow_headers_are_cut_off_at_the_header_deadline(server):
    def slowloris() -> tuple[bool, bytes, float]:
        sock = _connect(server, "127.0.0.4")
        start = time.monotonic()
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200
        sent = b""
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - start > 8:
                    break
        except OSError:
            pass  # cut off, as it should be
        closed, sent = _closed_within(sock, 5)
        sock.close()
        return closed, sent, time.monotonic() - start

    with ThreadPoolExecutor(6) as pool:
        attacks = [pool.submit(slowloris) for _ in range(6)]
        time.sleep(0.3)
        _normal(server)
        results = [a.result() for a in attacks]
    for closed, sent, seconds in results:
        assert closed and sent.startswith(b"HTTP/1.1 408 ")
        assert seconds < LIMITS["header_timeout"] + 2.5
    _wait_until_quiet(server)


def test_headers_without_a_body_hold_no_place_in_the_queue(server):
    attackers = []
    for _ in range(2 * LIMITS["max_queue"]):  # twice the queue, from two addresses (per-client cap is 8)
        sock = _connect(server, "127.0.0.5" if len(attackers) % 2 else "127.0.0.6")
        sock.sendall(b"POST /api/matte HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000000\r\n\r\n")
        attackers.append(sock)
    try:
        time.sleep(0.3)
        assert _info(server)["in_service"] == 0  # not admitted: their bodies never came
        _normal(server)  # --max-queue 4, eight requests waiting for bodies: this one is served
        for sock in attackers:
            closed, sent = _closed_within(sock, LIMITS["body_timeout"] + 6)
            assert closed and sent.startswith(b"HTTP/1.1 408 "), sent[:200]
            assert b"request body not received within 1.5 s" in sent
    finally:
        for sock in attackers:
            sock.close()
    _wait_until_quiet(server)


class _SlowSource(http.server.BaseHTTPRequestHandler):
    """A remote image server that sends its status line a byte at a time, for ever (or until cut off)."""

    closed_at: list[float] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        try:
            for _ in range(600):
                self.wfile.write(b"H")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass
        _SlowSource.closed_at.append(time.monotonic())


@pytest.fixture(scope="module")
def slow_source():
    with loopback_http(_SlowSource) as httpd:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/slow.png"


def test_a_slow_url_source_is_cut_off_at_the_url_deadline(server, slow_source):
    def fetch() -> tuple[int, str, float]:
        start = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=20) as c:
            r = c.get("/api/matte", params={"url": slow_source})
        return r.status_code, r.text, time.monotonic() - start

    with ThreadPoolExecutor(4) as pool:
        fetches = [pool.submit(fetch) for _ in range(4)]
        time.sleep(0.3)
        _normal(server)
        results = [f.result() for f in fetches]
    for status, text, seconds in results:
        assert status == 504 and "time-out after 4 s" in text
        assert seconds < LIMITS["url_timeout"] + 2.0  # one deadline for status line, headers and body


def test_a_url_fetch_stops_when_its_client_leaves(server, slow_source):
    _SlowSource.closed_at.clear()
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as sock:
        sock.sendall(b"GET /api/matte?url=" + slow_source.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.4)  # the fetch is under way
    left = time.monotonic()
    deadline = left + LIMITS["url_timeout"]
    while not _SlowSource.closed_at and time.monotonic() < deadline:
        time.sleep(0.02)
    # the remote connection closed well before the fetch's own deadline would have closed it
    assert _SlowSource.closed_at and _SlowSource.closed_at[0] - left < 0.8, _SlowSource.closed_at
    assert _info(server)["in_service"] == 0


def test_a_model_size_over_the_limit_is_refused_before_any_work(server):
    with httpx.Client(base_url=server.url, timeout=20) as c:
        for size, why in (("4096", "limit of 4096 pixels per side"), ("1024", "--max-model-pixels"),
                          ("512x640", "0.33 MP, over the limit of 0.3 MP (--max-model-pixels)")):
            start = time.monotonic()
            r = c.post("/api/matte", params={"size": size}, files={"file": ("p.png", _png())})
            assert r.status_code == 422 and why in r.json()["detail"], r.text
            assert time.monotonic() - start < 2.0
        r = c.post("/api/matte", params={"size": "512x576", "mode": "matte"}, files={"file": ("p.png", _png())})
        assert r.status_code == 200 and r.headers["X-Model-Size"] == "512x576"  # 0.29 MP: under the limit
    _normal(server)


def test_a_multipart_body_of_many_parts_stops_at_the_part_limit(server):
    part = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n"
    body = part * 365_000 + b"--XyZ--\r\n"
    assert len(body) > 19_000_000

    def flood() -> tuple[int, str, float]:
        start = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/api/matte", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"})
        return r.status_code, r.text, time.monotonic() - start

    with ThreadPoolExecutor(3) as pool:
        floods = [pool.submit(flood) for _ in range(3)]
        _normal(server)
        results = [f.result() for f in floods]
    for status, text, _seconds in results:
        assert status == 413 and "more than 64 parts" in text


def test_a_huge_parameter_is_not_echoed(server):
    value = "x" * 19_000_000
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for files, status in (({"mode": (None, value), "file": ("p.png", _png())}, 422),
                              ({"x" * 4000: (None, "1"), "file": ("p.png", _png())}, 422),
                              ({"x" * 1_000_000: (None, "1"), "file": ("p.png", _png())}, 400)):  # over a part header's limit
            r = c.post("/api/matte", files=files)
            assert r.status_code == status and len(r.content) < 1000, r.content[:300]
        r = c.post("/api/matte", params={"url": "http://" + "h" * 8000 + "/x.png"})  # the longest url allowed
        assert r.status_code == 502 and len(r.content) < 1000, r.content[:300]
    time.sleep(0.2)
    assert max(len(line) for line in server.log().splitlines()) < 1000
    _normal(server)


def test_the_server_stays_within_its_memory_and_log_bounds(server):
    """After every family above: no request in service, no descriptor leak, a log of lines, not tracebacks."""
    info = _info(server)
    assert info["in_service"] == 0 and info["pixels_in_service"] == 0
    with open(f"/proc/{server.pid}/status") as fh:
        rss_mb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    assert rss_mb < info["memory_bound_mb"]["total"]
    open_fds = len(list((__import__("pathlib").Path(f"/proc/{server.pid}/fd")).iterdir()))
    assert open_fds < FILES_CAP // 2
    log = server.log()
    assert "Traceback" not in log and len(log) < 200_000


def test_a_background_text_field_is_a_colour(server):
    """curl -F background='#1e88e5' (README's example): a text field, the same as ?background=."""
    image = _png()
    with httpx.Client(base_url=server.url, timeout=20) as c:
        for spec in ("#1e88e5", "blur"):
            r = c.post("/api/matte", files={"file": ("p.png", image), "background": (None, spec),
                                            "mode": (None, "composite")})
            assert r.status_code == 200, r.text
            by_query = c.post("/api/matte", params={"mode": "composite", "background": spec},
                              files={"file": ("p.png", image)})
            assert r.content == by_query.content


def test_sigterm_during_a_slow_fetch_stops_the_server_at_once(server, slow_source):
    """Last: it stops the module's server (whose teardown then checks its exit and its log)."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: httpx.get(server.url + "/api/matte", params={"url": slow_source}, timeout=30))
        time.sleep(0.5)  # the fetch is under way; its deadline is 3.5 s away
        start = time.monotonic()
        assert server.stop() == -signal.SIGTERM
        assert time.monotonic() - start < 3.0  # it did not wait for the remote server
        with contextlib.suppress(httpx.HTTPError):
            assert pending.result().status_code in (499, 503)
