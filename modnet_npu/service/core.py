"""The service's shared state: the model (loaded on a thread after start), the pools, fetching,
inference through the batcher, and what ``/api/info`` reports.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from modnet_npu.matting.imaging import ShortSide, Size, SizeSpec, input_size
from modnet_npu.matting.matter import Matter
from modnet_npu.service import url_fetch
from modnet_npu.service.admission import Admission, Batcher, Inferred, Slot
from modnet_npu.service.limits import ApiError, ServiceSettings
from modnet_npu.service.params import REMBG_HONOURED, REMBG_IGNORED

log = logging.getLogger("modnet.serve")

# the image used to warm the model up: the size a typical upload is inferred at
_WARMUP_IMAGE = (512, 512)

# --------------------------------------------------------------------------
# the service: state shared by the routes
# --------------------------------------------------------------------------


@dataclass
class Service:
    settings: ServiceSettings
    open_matter: Callable[[], Matter]
    on_fatal: Callable[[str], None] = lambda message: None
    matter: Matter | None = None
    load_error: str | None = None
    requests_served: int = 0
    batcher: Batcher = field(init=False)
    admission: Admission = field(init=False)
    io_pool: ThreadPoolExecutor = field(init=False)
    fetch_pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.batcher = Batcher(self._infer, window_s=s.batch_window_ms / 1000.0, max_batch=s.max_batch)
        self.admission = Admission(s.max_queue)
        self.io_pool = ThreadPoolExecutor(s.io_threads, thread_name_prefix="io")
        self.fetch_pool = ThreadPoolExecutor(s.fetch_threads, thread_name_prefix="fetch")

    # -- start and stop -----------------------------------------------------

    def start(self) -> None:
        self.batcher.start()
        loop = asyncio.get_running_loop()
        # daemon: a download still running at Ctrl-C must not keep the process alive
        threading.Thread(target=self._load, args=(loop,), name="model-loader", daemon=True).start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            matter = self.open_matter()
            self.batcher.executor.submit(self._warm_up, matter).result()
        except Exception as exc:  # any failure to open the model ends the server with one line
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped meanwhile
                loop.call_soon_threadsafe(self._failed, message)
            return
        try:
            loop.call_soon_threadsafe(self._ready, matter)
        except RuntimeError:  # the server stopped while the model loaded
            matter.close()

    def _warm_up(self, matter: Matter) -> None:
        """First forwards (one image, then two) at the size a typical upload gets, off the request path."""
        size = matter.model_size(*_WARMUP_IMAGE)
        gray = np.full((*_WARMUP_IMAGE, 3), 128, np.uint8)
        for n in sorted({1, min(2, self.settings.max_batch)}):
            matter.infer_batch([gray] * n, size)

    def _ready(self, matter: Matter) -> None:
        self.matter = matter
        log.info("ready: %s; model %s (%s)", matter.engine.description, os.path.basename(matter.source.path),
                 matter.source.source)
        if matter.source.warning:
            log.warning("WARNING: %s", matter.source.warning)

    def _failed(self, message: str) -> None:
        self.load_error = message
        log.error("error: model could not be loaded: %s", message)
        self.on_fatal(message)

    async def stop(self) -> None:
        await self.batcher.stop()
        self.io_pool.shutdown(wait=True)
        self.fetch_pool.shutdown(wait=True)
        if self.matter is not None:
            self.matter.close()

    # -- the work -----------------------------------------------------------

    def require_ready(self) -> Matter:
        if self.matter is not None:
            return self.matter
        if self.load_error is not None:
            raise ApiError(503, f"model could not be loaded: {self.load_error}")
        raise ApiError(503, "model still loading; retry shortly", {"Retry-After": "2"})

    def _infer(self, images: list[np.ndarray], size: Size) -> list[np.ndarray]:
        assert self.matter is not None
        return self.matter.infer_batch(images, size)

    async def on_io(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    async def fetch(self, url: str) -> bytes:
        s = self.settings
        call = lambda: url_fetch.fetch(url, max_bytes=s.max_bytes, timeout=s.fetch_timeout_s,  # noqa: E731
                                       allow_private=s.allow_private_urls)
        try:
            fetched = await asyncio.get_running_loop().run_in_executor(self.fetch_pool, call)
        except url_fetch.UrlFetchError as exc:
            raise ApiError(exc.status, str(exc)) from None
        return fetched.data

    def model_size(self, matter: Matter, spec: SizeSpec | None, height: int, width: int) -> Size:
        if spec is None:
            return matter.model_size(height, width)
        fixed = matter.engine.fixed_size
        if fixed is not None:
            raise ApiError(422, f"size: this model file takes {fixed[0]}x{fixed[1]} only on the "
                                f"{matter.engine.name} backend")
        try:
            return input_size(spec, height, width)
        except ValueError as exc:
            raise ApiError(422, f"size: {exc}") from None

    async def infer(self, matter: Matter, rgb: np.ndarray, spec: SizeSpec | None, slot: Slot) -> Inferred:
        size = self.model_size(matter, spec, *rgb.shape[:2])
        future = self.batcher.submit(rgb, size, slot)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # still waiting: dropped from its group; running: its result is dropped
            raise ApiError(504, f"inference took over {self.settings.timeout_s:g} s") from None

    def info(self) -> dict[str, Any]:
        """What ``/api/info`` reports."""
        s = self.settings
        out: dict[str, Any] = {
            "ready": self.matter is not None,
            "load_error": self.load_error,
            "requests_served": self.requests_served,
            "forward_passes": self.batcher.forward_passes,
            "images_inferred": self.batcher.images_inferred,
            "in_service": self.admission.active,
            "batching": {"window_ms": s.batch_window_ms, "max_batch": s.max_batch, "inference_workers": 1},
            "limits": {"max_bytes": s.max_bytes, "max_pixels": s.max_pixels, "max_queue": s.max_queue,
                       "timeout_s": s.timeout_s, "url_timeout_s": s.fetch_timeout_s,
                       "private_urls_allowed": s.allow_private_urls},
            "rembg": {"routes": ["POST /api/remove", "GET /api/remove?url=..."], "honoured": REMBG_HONOURED,
                      "ignored_parameters": list(REMBG_IGNORED),
                      "note": "rembg's model choice and its alpha-matting and mask post-processing options "
                              "do not apply to MODNet: they are accepted and ignored"},
        }
        if self.matter is not None:
            out |= _engine_info(self.matter)
        return out


def _engine_info(matter: Matter) -> dict[str, Any]:
    engine, source = matter.engine, matter.source
    return {
        "model": {"source": source.source, "file": os.path.basename(source.path), "sha256": source.sha256,
                  "method": source.method, "warning": source.warning},
        "warning": source.warning,
        "backend": engine.name,
        "device": str(getattr(engine, "device", "cpu")),
        "precision": getattr(engine, "precision", "fp32"),
        "fast_path": getattr(engine, "describe", "onnxruntime"),
        "engine": engine.description,
        "model_size": _size_text(matter),
    }


def _size_text(matter: Matter) -> str:
    if matter.engine.fixed_size is not None:
        return "{}x{} (fixed by the model file)".format(*matter.engine.fixed_size)
    spec = matter.size
    if spec == "auto":
        return "auto"
    if isinstance(spec, ShortSide):
        return f"short side {spec.pixels}"
    return "{}x{}".format(*spec)

