"""Admission and batching: how many requests are in the service, and how their images share forward passes.

:class:`Admission` bounds the requests in the service at once; :class:`Batcher`
groups waiting images by model input size and runs each group as one forward
on the single inference thread.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from modnet_npu.matting.imaging import Size
from modnet_npu.service.limits import ApiError

# --------------------------------------------------------------------------
# admission: at most max_queue requests in the service at once
# --------------------------------------------------------------------------


class Admission:
    """Requests in the service, from their complete body to the last byte of their answer.

    Two bounds: the number of requests (``limit``; more get 503 with
    Retry-After instead of piling up), and the image pixels they hold
    (``pixel_budget``): a request that has read its image's header waits its
    turn (first come, first served) until its pixels fit, for at most its
    time-out. Together with the per-pixel costs in :mod:`limits` they bound
    memory, whatever the mix of image sizes. A request is admitted only once
    its body is in (or its url= image fetched): a client that sends headers and no body
    holds a connection, never a place here.
    """

    def __init__(self, limit: int, pixel_budget: int) -> None:
        self.limit = limit
        self.pixel_budget = pixel_budget
        self.active = 0
        self.pixels = 0
        self._waiters: deque[_PixelWait] = deque()

    def enter(self) -> "Slot":
        if self.active >= self.limit:
            raise ApiError(503, f"server busy: {self.limit} requests already queued; retry shortly",
                           {"Retry-After": "1"})
        self.active += 1
        return Slot(self)

    async def reserve(self, slot: "Slot", pixels: int, timeout: float) -> None:
        """Hold ``pixels`` for ``slot`` (returned when it is released); 503 when they do not fit in time.

        An image larger than the whole budget (possible only when the budget is
        set below twice --max-pixels) waits until it can run alone.
        """
        wait = _PixelWait(slot, min(pixels, self.pixel_budget), asyncio.get_running_loop().create_future())
        self._waiters.append(wait)
        self._wake()
        if wait.future.done():
            return
        try:
            await asyncio.wait_for(wait.future, timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, f"server busy: {self.pixels / 1e6:.1f} MP of images in service (the limit is "
                                f"{self.pixel_budget / 1e6:g} MP); retry shortly", {"Retry-After": "1"}) from None
        finally:
            self._wake()  # a wait given up at the head must not block those behind it

    def _wake(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():  # given up (time-out, client gone)
                self._waiters.popleft()
                continue
            if self.pixels + head.pixels > self.pixel_budget:
                return
            self._waiters.popleft()
            # granted here, to the slot itself: whatever happens to the waiting task, release() returns them
            self.pixels += head.pixels
            head.slot.pixels += head.pixels
            head.future.set_result(None)

    def _release(self, slot: "Slot") -> None:
        self.active -= 1
        self.pixels -= slot.pixels
        slot.pixels = 0
        self._wake()


@dataclass
class _PixelWait:
    slot: "Slot"
    pixels: int
    future: asyncio.Future


class Slot:
    """One admitted request; freed when its handler, its answer and its inference (if any) are done.

    A request that timed out leaves its handler while its image may still be in
    a forward pass; the slot stays taken until that pass ends, so clients that
    retry after a 504 cannot pile up work behind the worker.
    """

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.refs = 1
        self.pixels = 0

    def share(self) -> "Slot":
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.admission._release(self)


# --------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Inferred:
    alpha: np.ndarray  # float matte at the image's own size
    inference_ms: float  # the forward pass this image rode in
    batch_size: int
    model_size: Size


@dataclass
class _Waiting:
    rgb: np.ndarray
    future: asyncio.Future
    arrived: float
    slot: Slot


class Batcher:
    """Waiting images grouped by model input size; each group run as one forward on one worker thread.

    A group runs when it is full or its oldest image has waited ``window_s``,
    and only when the worker is free: while a forward runs, the next group
    keeps filling, so under load batches grow by themselves, and a lone request
    waits at most the window. Full is ``max_batch`` images, or fewer where the
    model input is large: a batch holds at most ``max_pixels`` model input
    pixels (at least one image), so one forward's memory is bounded whatever the
    size (:data:`limits.FORWARD_BYTES_PER_MODEL_PIXEL`).
    """

    def __init__(self, infer: Callable[[list[np.ndarray], Size], list[np.ndarray]], *, window_s: float,
                 max_batch: int, max_pixels: int | None = None) -> None:
        self.infer = infer
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        self.groups: dict[Size, list[_Waiting]] = {}
        # one thread: the device runs one forward at a time, and engines keep per-thread state
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.forward_passes = 0
        self.images_inferred = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for items in self.groups.values():
            for item in items:
                item.future.cancel()
                item.slot.release()
        self.groups.clear()
        self.executor.shutdown(wait=True)

    def submit(self, rgb: np.ndarray, size: Size, slot: Slot) -> asyncio.Future:
        """A future of :class:`Inferred` for ``rgb`` at model input ``size``; cancel it to give up."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.groups.setdefault(size, []).append(_Waiting(rgb, future, loop.time(), slot.share()))
        assert self._wakeup is not None, "Batcher.start() first"
        self._wakeup.set()
        return future

    def capacity(self, size: Size) -> int:
        """The most images of model input ``size`` in one forward."""
        if self.max_pixels is None:
            return self.max_batch
        return max(1, min(self.max_batch, self.max_pixels // (size[0] * size[1])))

    def _take(self) -> tuple[Size, list[_Waiting]] | float:
        """The oldest group that is ready (full or past its window), or the seconds until one is."""
        now = asyncio.get_running_loop().time()
        ready: tuple[float, Size] | None = None
        wait = math.inf
        for size, items in list(self.groups.items()):
            for item in [it for it in items if it.future.done()]:  # given up (time-out) before running
                items.remove(item)
                item.slot.release()
            if not items:
                del self.groups[size]
                continue
            due = items[0].arrived + self.window_s - now
            if len(items) >= self.capacity(size) or due <= 0:
                if ready is None or items[0].arrived < ready[0]:
                    ready = (items[0].arrived, size)
            else:
                wait = min(wait, due)
        if ready is None:
            return wait
        size = ready[1]
        items = self.groups[size]
        full = self.capacity(size)
        taken, rest = items[:full], items[full:]
        if rest:
            self.groups[size] = rest
        else:
            del self.groups[size]
        return size, taken

    async def _next(self) -> tuple[Size, list[_Waiting]]:
        assert self._wakeup is not None
        while True:
            taken = self._take()
            if not isinstance(taken, float):
                return taken
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), None if math.isinf(taken) else taken)
            except asyncio.TimeoutError:
                pass

    async def _run(self) -> None:
        while True:
            size, items = await self._next()
            try:
                await self._run_batch(size, items)
            except Exception as exc:  # whatever the engine raised goes to this batch's requests, never ends the worker
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
            finally:
                for item in items:
                    item.slot.release()

    async def _run_batch(self, size: Size, items: list[_Waiting]) -> None:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        alphas = await loop.run_in_executor(self.executor, self.infer, [it.rgb for it in items], size)
        ms = (time.perf_counter() - start) * 1000.0
        self.forward_passes += 1
        self.images_inferred += len(items)
        for item, alpha in zip(items, alphas, strict=True):
            if not item.future.done():
                item.future.set_result(Inferred(alpha, ms, len(items), size))

