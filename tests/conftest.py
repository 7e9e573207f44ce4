"""Shared fixtures (MODNet ONNX files in every flavour, made once per session) and the markers.

Exports take ~30 s on two cores, so the files are cached in pytest's cache
folder, keyed by the code and library versions that produce them.

Markers (registered in pyproject.toml) are applied here, by test module, test name and fixture,
so test files need no edits: ``slow``, ``browser``, ``ray``, ``device``, and ``fast`` for every
test with none of those. The fast subset: ``python3 -m pytest -q -m fast tests``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib.util
import threading
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modnet_npu.source import synthetic as synthetic_model  # noqa: E402

PORTRAIT = ROOT / "assets" / "portrait_astronaut.jpg"


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


# --------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------

# every test of a module
MODULE_MARKERS: dict[str, tuple[str, ...]] = {
    "test_serve_browser.py": ("browser", "slow"),
    "test_error_contract.py": ("slow",),  # 16 commands as subprocesses, each loading torch: ~35 s of CPU
}

# every test that uses a fixture (module, fixture name): the fixture starts Ray, or costs seconds
FIXTURE_MARKERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("test_scaleout.py", "cluster"): ("ray", "slow"),
}

# single tests (module, test name without its parameters)
TEST_MARKERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("test_scaleout.py", "test_missing_device_fails_fast_and_the_local_ray_is_shut_down"): ("ray", "slow"),
    ("test_devices.py", "test_cuda_index_out_of_range"): ("device",),
    ("test_acceleration.py", "test_cuda_graph_capture_matches_eager"): ("device",),
}

NOT_FAST = ("slow", "browser", "ray", "device")


@functools.lru_cache(maxsize=1)
def accelerator() -> str | None:
    """The accelerator this machine has ("cuda", "npu", "mps"), or None."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if importlib.util.find_spec("torch_npu") is not None:
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)

            if torch.npu.is_available():
                return "npu"
        except Exception:  # a broken CANN set-up: no usable NPU, which is what the skip says
            pass
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else None


def _markers_for(item: pytest.Item) -> set[str]:
    module = item.path.name
    names = set(MODULE_MARKERS.get(module, ()))
    names.update(TEST_MARKERS.get((module, item.originalname), ()))
    params = item.callspec.params if hasattr(item, "callspec") else {}
    for fixture in getattr(item, "fixturenames", ()):
        if fixture not in params:  # a parameter that happens to share a fixture's name is not it
            names.update(FIXTURE_MARKERS.get((module, fixture), ()))
    return names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name in sorted(_markers_for(item)):
            item.add_marker(name)
        if item.get_closest_marker("device") is not None and accelerator() is None:
            item.add_marker(pytest.mark.skip(reason="needs an accelerator (CUDA, Ascend NPU or MPS): none here"))
        if not any(item.get_closest_marker(name) for name in NOT_FAST):
            item.add_marker("fast")
