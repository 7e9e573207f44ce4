"""Downloads against a real HTTP server on 127.0.0.1 (no internet needed)."""
from __future__ import annotations

import hashlib
import http.server
import os
import socket
from pathlib import Path

import pytest

from modnet_npu.source import resolve as ms
from conftest import loopback_http

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        if self.path.endswith("/truncated.onnx"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.endswith("/missing.onnx"):
            self.send_error(404)
            return
        self.server.hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)


@pytest.fixture
def server():
    with loopback_http(_Handler) as srv:
        srv.hits = 0
        yield srv


def _url(srv, name):
    return f"http://127.0.0.1:{srv.server_address[1]}/files/{name}"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file()]


def test_url_download_then_cache(server, tmp_path):
    src = ms.resolve_model(_url(server, "m.onnx"), str(tmp_path), sha256=SHA, progress=False)
    assert src.source == "url" and src.sha256 == SHA
    assert Path(src.path).read_bytes() == PAYLOAD
    again = ms.resolve_model(_url(server, "m.onnx"), str(tmp_path), sha256=SHA, progress=False)
    assert again.source == "cache" and server.hits == 1
    assert _files(tmp_path) == [src.path]


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    with pytest.raises(ms.ModelSourceError, match="checksum mismatch"):
        ms.resolve_model(_url(server, "m.onnx"), str(tmp_path), sha256="0" * 64, progress=False)
    assert _files(tmp_path) == []


def test_refused_connection_leaves_nothing(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/m.onnx"
    with pytest.raises(ms.ModelSourceError, match="connection refused"):
        ms.resolve_model(url, str(tmp_path), retries=2, progress=False)
    assert _files(tmp_path) == []


def test_truncated_download_leaves_nothing(server, tmp_path):
    with pytest.raises(ms.ModelSourceError, match=r"truncated|broke off"):
        ms.resolve_model(_url(server, "truncated.onnx"), str(tmp_path), retries=2, progress=False)
    assert _files(tmp_path) == []


def test_http_error_is_final(server, tmp_path):
    with pytest.raises(ms.ModelSourceError, match="HTTP 404"):
        ms.resolve_model(_url(server, "missing.onnx"), str(tmp_path), progress=False)
    assert _files(tmp_path) == []


def test_model_id_through_a_mirror_then_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    # pretend neither optional client is installed, whatever this machine has
    monkeypatch.setattr(ms, "_via_modelscope", _not_installed)
    monkeypatch.setattr(ms, "_via_hf_hub", _not_installed)
    src = ms.resolve_model("someone/modnet-copy", str(tmp_path), sha256=SHA, progress=False)
    assert src.source == "download" and src.method == "https"
    assert src.path == ms.cache_path("someone/modnet-copy", models_dir=str(tmp_path))
    assert len(src.attempts) == 2
    assert ms.resolve_model("someone/modnet-copy", str(tmp_path), sha256=SHA).source == "cache"


def test_cached_file_with_wrong_hash_is_fetched_again(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(ms, "_via_modelscope", _not_installed)
    monkeypatch.setattr(ms, "_via_hf_hub", _not_installed)
    dest = Path(ms.cache_path("someone/m", models_dir=str(tmp_path)))
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"stale")
    src = ms.resolve_model("someone/m", str(tmp_path), sha256=SHA, progress=False)
    assert src.source == "download" and dest.read_bytes() == PAYLOAD


def _not_installed(*args, **kwargs):
    raise ms.ModelSourceError("not installed (test)")


def test_offline_and_bad_specs(tmp_path):
    with pytest.raises(ms.ModelSourceError, match="offline"):
        ms.resolve_model("onnx-community/modnet-webnn", str(tmp_path), offline=True)
    with pytest.raises(ms.ModelSourceError, match="no such file"):
        ms.resolve_model(str(tmp_path / "nope.onnx"), str(tmp_path))
    with pytest.raises(ms.ModelSourceError, match="neither a file"):
        ms.resolve_model("not a model", str(tmp_path))


def test_local_file_checksum(tmp_path):
    f = tmp_path / "x.onnx"
    f.write_bytes(PAYLOAD)
    assert ms.resolve_model(str(f), str(tmp_path), sha256=SHA).source == "local"
    with pytest.raises(ms.ModelSourceError, match="checksum"):
        ms.resolve_model(str(f), str(tmp_path), sha256="1" * 64)


def test_stale_download_temporaries_are_removed_at_resolution(server, tmp_path):
    import time

    cache = Path(ms.cache_path("someone/m", models_dir=str(tmp_path))).parent
    cache.mkdir(parents=True)
    stale = cache / ".model.k3j_a9zq.part.onnx"  # what a SIGKILLed download leaves
    fresh = cache / ".model.zz9x8c7v.part.onnx"  # a concurrent run still writing
    user = tmp_path / ".notes.part"
    for p in (stale, fresh, user):
        p.write_bytes(b"\0" * 1000)
    old = time.time() - 2 * 3600
    for p in (stale, user):
        os.utime(p, (old, old))
    logged = []
    with pytest.raises(ms.DownloadError, match="offline"):
        ms.resolve_model("someone/m", str(tmp_path), offline=True, log=logged.append)
    assert not stale.exists() and fresh.exists() and user.exists()
    assert any("removed 1 stale temporary" in m for m in logged)
    # a local model path never touches the models folder
    os.utime(fresh, (old, old))
    local = tmp_path / "x.onnx"
    local.write_bytes(PAYLOAD)
    ms.resolve_model(str(local), str(tmp_path))
    assert fresh.exists()
