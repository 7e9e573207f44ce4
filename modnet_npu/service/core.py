"""The service's shared state: the model (loaded on a thread after start), the pools, fetching,
inference through the batcher, and what ``/api/info`` reports.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from modnet_npu.matting.imaging import ShortSide, Size, SizeSpec
from modnet_npu.matting.matter import Matter
from modnet_npu.service import url_fetch
from modnet_npu.service.admission import Admission, Batcher, Inferred, Slot
from modnet_npu.service.limits import ApiError, MemoryBound, ServiceSettings, clip, memory_bound
from modnet_npu.service.params import REMBG_HONOURED, REMBG_IGNORED

log = logging.getLogger("modnet.serve")

# the image used to warm the model up: the size a typical upload is inferred at
_WARMUP_IMAGE = (512, 512)

# --------------------------------------------------------------------------
# the service: state shared by the routes
# --------------------------------------------------------------------------


class FetchThreads:
    """At most ``count`` URL fetches at once, each on a daemon thread that is never waited for.

    A fetch ends at its own deadline or when :meth:`FetchControl.abort` shuts
    its connection; only a name lookup cannot be cut short, and a thread stuck
    in one must not hold the server's shutdown: daemon threads, counted until
    they really end, so a slow resolver cannot make them pile up either.
    """

    def __init__(self, count: int) -> None:
        self.free = count
        self.stopping = False
        self.controls: set[url_fetch.FetchControl] = set()
        self._waiters: deque[asyncio.Future] = deque()

    async def run(self, fn: Callable[[url_fetch.FetchControl], Any], timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        control = url_fetch.FetchControl()
        if self.stopping:
            raise url_fetch.UrlFetchError("url: not fetched: the server is shutting down", 503)
        try:
            await asyncio.wait_for(self._take(), timeout)
            if self.stopping:  # shut down while it waited for a thread
                self._finish(loop.create_future(), (None, None))
                raise url_fetch.UrlFetchError("url: not fetched: the server is shutting down", 503)
            done: asyncio.Future = loop.create_future()
            # its outcome may come after the request gave up: taken here, so asyncio does not log it as lost
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.controls.add(control)
            try:
                threading.Thread(target=self._work, args=(loop, fn, control, done), name="fetch",
                                 daemon=True).start()
            except RuntimeError:  # no thread to be had: the place is free again
                self._finish(done, (None, url_fetch.UrlFetchError("url: no thread free to fetch it", 503)))
            # a little past the fetch's own deadline: only a hung name lookup needs it
            return await asyncio.wait_for(asyncio.shield(done), timeout + 1.0)
        except asyncio.TimeoutError:
            raise url_fetch.UrlFetchError(f"url: time-out after {timeout:g} s", 504) from None
        finally:
            control.abort()  # the client went, the server stops, or it is over: its connection closes now
            self.controls.discard(control)

    async def _take(self) -> None:
        while self.free == 0:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self.free -= 1

    def _work(self, loop: asyncio.AbstractEventLoop, fn: Callable, control: url_fetch.FetchControl,
              done: asyncio.Future) -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(control), None)
        except BaseException as exc:  # handed to the waiting request, whatever it is
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped meanwhile
            loop.call_soon_threadsafe(self._finish, done, outcome)

    def _finish(self, done: asyncio.Future, outcome: tuple[Any, BaseException | None]) -> None:
        self.free += 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if done.done():
            return
        if outcome[1] is not None:
            done.set_exception(outcome[1])
        else:
            done.set_result(outcome[0])

    def abort_all(self) -> None:
        """Stop every fetch now, and refuse new ones (the server is stopping)."""
        self.stopping = True
        for control in list(self.controls):
            control.abort("shutdown")


def _rss_bytes() -> int:
    """This process's resident memory now (Linux), or its peak elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


@dataclass
class Service:
    settings: ServiceSettings
    open_matter: Callable[[], Matter]
    on_fatal: Callable[[str], None] = lambda message: None
    matter: Matter | None = None
    load_error: str | None = None
    requests_served: int = 0
    memory: MemoryBound | None = None  # the limits' worst case, once the model is loaded
    batcher: Batcher = field(init=False)
    admission: Admission = field(init=False)
    io_pool: ThreadPoolExecutor = field(init=False)
    fetches: FetchThreads = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.batcher = Batcher(self._infer, window_s=s.batch_window_ms / 1000.0, max_batch=s.max_batch,
                               max_pixels=s.max_model_pixels)
        self.admission = Admission(s.max_queue, s.pixel_budget)
        self.io_pool = ThreadPoolExecutor(s.io_threads, thread_name_prefix="io")
        self.fetches = FetchThreads(s.fetch_threads)

    # -- start and stop -----------------------------------------------------

    def start(self) -> None:
        self.batcher.start()
        loop = asyncio.get_running_loop()
        # daemon: a download still running at Ctrl-C must not keep the process alive
        threading.Thread(target=self._load, args=(loop,), name="model-loader", daemon=True).start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            matter = self.open_matter()
            _bound_arena(matter)
            self.batcher.executor.submit(self._warm_up, matter).result()
        except Exception as exc:  # any failure to open the model ends the server with one line
            message = clip(str(exc) or type(exc).__name__)
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped meanwhile
                loop.call_soon_threadsafe(self._failed, message)
            return
        try:
            loop.call_soon_threadsafe(self._ready, matter)
        except RuntimeError:  # the server stopped while the model loaded
            matter.close()

    def _warm_up(self, matter: Matter) -> None:
        """Off the request path: the batch sizes this service can form (up to --max-batch, within the model-pixel
        budget) compiled or captured at the size a typical upload gets, else the first forwards (``Matter.warm_up``)."""
        size = matter.model_size(*_WARMUP_IMAGE)
        matter.warm_up([size], max_batch=self.batcher.capacity(size))

    def _ready(self, matter: Matter) -> None:
        self.matter = matter
        self.memory = memory_bound(self.settings, _rss_bytes())
        log.info("ready: %s; model %s (%s)", matter.engine.description, os.path.basename(matter.source.path),
                 matter.source.source)
        terms = self.memory.to_dict()
        log.info("memory: at most %.1f GB with these limits (%s MB)", terms.pop("total") / 1000,
                 ", ".join(f"{k} {v:g}" for k, v in terms.items()))
        if matter.source.warning:
            log.warning("WARNING: %s", matter.source.warning)

    def _failed(self, message: str) -> None:
        self.load_error = message
        log.error("error: model could not be loaded: %s", message)
        self.on_fatal(message)

    async def stop(self) -> None:
        self.fetches.abort_all()  # never wait on a remote server
        await self.batcher.stop()
        self.io_pool.shutdown(wait=True)
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

    async def fetch(self, url: str, status: Callable[[url_fetch.UrlFetchError], int] | None = None) -> bytes:
        """The image at ``url``; cancelling the awaiting task closes the fetch's connection at once. A failure
        is an ApiError with the fetch's own status, or ``status(error)`` (a route's: rembg's answers 400)."""
        s = self.settings

        def call(control: url_fetch.FetchControl) -> url_fetch.Fetched:
            return url_fetch.fetch(url, max_bytes=s.max_bytes, timeout=s.fetch_timeout_s,
                                   allow_private=s.allow_private_urls, control=control)

        try:
            fetched = await self.fetches.run(call, s.fetch_timeout_s)
        except url_fetch.UrlFetchError as exc:
            raise ApiError(exc.status if status is None else status(exc), str(exc)) from None
        return fetched.data

    def model_size(self, matter: Matter, spec: SizeSpec | None, height: int, width: int) -> Size:
        """The model input size for this request: 422 past --max-model-pixels or the engine's limits.

        ``Matter.model_size`` is the one rule (a size asked of a file whose input size is fixed included);
        here its refusals become 422s, named after the request's ``size`` when it asked for one."""
        try:
            size = matter.model_size(height, width, size=spec)  # the request's size, else the server's
        except ValueError as exc:
            raise ApiError(422, f"size: {exc}" if spec is not None else str(exc)) from None
        limit = self.settings.max_model_pixels
        if matter.engine.fixed_size is None and size[0] * size[1] > limit:
            raise ApiError(422, f"size: model input {size[0]}x{size[1]} is {size[0] * size[1] / 1e6:.2f} MP, over "
                                f"the limit of {limit / 1e6:g} MP (--max-model-pixels); ask for a smaller size")
        return size

    async def infer(self, matter: Matter, rgb: np.ndarray, size: Size, slot: Slot) -> Inferred:
        future = self.batcher.submit(rgb, size, slot)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # still waiting: dropped from its group; running: its result is dropped
            raise ApiError(504, f"inference took over {self.settings.timeout_s:g} s") from None
        except asyncio.CancelledError:  # the client went: the same, without an answer
            future.cancel()
            raise

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
            "pixels_in_service": self.admission.pixels,
            "batching": {"window_ms": s.batch_window_ms, "max_batch": s.max_batch, "inference_workers": 1},
            "limits": {"max_bytes": s.max_bytes, "max_pixels": s.max_pixels, "max_model_pixels": s.max_model_pixels,
                       "max_queue": s.max_queue, "queue_pixels": s.pixel_budget, "timeout_s": s.timeout_s,
                       "url_timeout_s": s.fetch_timeout_s, "private_urls_allowed": s.allow_private_urls,
                       "max_connections": s.max_connections,
                       "max_connections_per_client": s.max_connections_per_client,
                       "header_timeout_s": s.header_timeout_s, "body_timeout_s": s.body_timeout_s,
                       "keep_alive_s": s.keep_alive_s},
            "memory_bound_mb": self.memory.to_dict() if self.memory is not None else None,
            "rembg": {"routes": ["POST /api/remove", "GET /api/remove?url=..."], "honoured": REMBG_HONOURED,
                      "ignored_parameters": list(REMBG_IGNORED),
                      "note": "rembg's model choice and its alpha-matting and mask post-processing options "
                              "do not apply to MODNet: they are accepted and ignored"},
        }
        if self.matter is not None:
            out |= _engine_info(self.matter)
        return out


# Model input pixels whose arena ONNX Runtime keeps between forwards: four images at 512x512 (about
# 500 MB at the 430-510 B per pixel measured, limits.py). Handing the arena back after every forward
# cost 13% of a 512x512 forward (435 -> 491 ms, real model, 2 threads, shared 2-core EPYC); after the
# larger ones only, a lone request keeps its memory and a burst of big batches cannot pin gigabytes.
ARENA_KEPT_PIXELS = 4 * 512 * 512


def _bound_arena(matter: Matter) -> None:
    """ONNX Runtime: hand the arena's free memory back after a forward larger than ``ARENA_KEPT_PIXELS``.

    The arena keeps what its largest forward took (and grows by powers of
    two): without this, one large request leaves the process gigabytes bigger
    for every request after it.
    """
    engine = matter.engine
    if getattr(engine, "name", "") == "ort" and hasattr(engine, "shrink_arena_above"):
        engine.shrink_arena_above = ARENA_KEPT_PIXELS


def _engine_info(matter: Matter) -> dict[str, Any]:
    engine, source = matter.engine, matter.source
    return {
        "model": {"source": source.source, "file": os.path.basename(source.path), "sha256": source.sha256,
                  "method": source.method, "warning": source.warning},
        "warning": source.warning,
        "backend": engine.name,
        "device": str(getattr(engine, "device", "cpu")),
        "precision": getattr(engine, "precision", "fp32"),
        "fast_path": engine.fast_path,
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

