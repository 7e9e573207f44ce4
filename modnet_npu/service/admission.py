"""Admission and batching: how many requests are in the service, and how their images share forward passes.

:class:`Admission` bounds the requests in the service at once; :class:`Batcher`
groups waiting images by model input size and runs each group as one forward
on the single inference thread.
"""
from __future__ import annotations

import asyncio
import math
import time
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
    """Requests in the service, from the first byte read to the last byte encoded.

    Bounding them bounds memory (each holds at most a body of ``max_bytes`` and
    an image of ``max_pixels``) and the wait behind the inference worker; the
    rest are told to come back (503 with Retry-After) instead of piling up.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def enter(self) -> "Slot":
        if self.active >= self.limit:
            raise ApiError(503, f"server busy: {self.limit} requests already queued; retry shortly",
                           {"Retry-After": "1"})
        self.active += 1
        return Slot(self)


class Slot:
    """One admitted request; freed when both its handler and its inference (if any) are done.

    A request that timed out leaves its handler while its image may still be in
    a forward pass; the slot stays taken until that pass ends, so clients that
    retry after a 504 cannot pile up work behind the worker.
    """

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.refs = 1

    def share(self) -> "Slot":
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.admission.active -= 1


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

    A group runs when it holds ``max_batch`` images or its oldest image has
    waited ``window_s``, and only when the worker is free: while a forward
    runs, the next group keeps filling, so under load batches grow by
    themselves, and a lone request waits at most the window.
    """

    def __init__(self, infer: Callable[[list[np.ndarray], Size], list[np.ndarray]], *, window_s: float,
                 max_batch: int) -> None:
        self.infer = infer
        self.window_s = window_s
        self.max_batch = max_batch
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

    def waiting(self) -> int:
        return sum(len(items) for items in self.groups.values())

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
            if len(items) >= self.max_batch or due <= 0:
                if ready is None or items[0].arrived < ready[0]:
                    ready = (items[0].arrived, size)
            else:
                wait = min(wait, due)
        if ready is None:
            return wait
        size = ready[1]
        items = self.groups[size]
        taken, rest = items[: self.max_batch], items[self.max_batch :]
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

