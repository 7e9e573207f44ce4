"""The PyTorch engine: the converted MODNet on a device at a precision, through ``acceleration``'s fast path.

It has the interface of ``engines.Engine`` (``infer``, ``timed``, ``fixed_size``,
``description``, ``fast_path``) and more: a fixed set of batch sizes per input
shape, prepared at :meth:`TorchEngine.warm_up`. Only the torch backend imports
this module (``engines.open_engine``): the ONNX Runtime and OpenVINO paths start
without torch.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from modnet_npu.matting.imaging import Size
from modnet_npu.model.precision import check as check_precision
from modnet_npu.runtime import devices
from modnet_npu.runtime.acceleration import (BATCH_SIZES, DEFAULT_COMPILE_CACHE, FastPathStats, GraphFactory,
                                             batch_set, make_runner, memory_now)
from modnet_npu.runtime.process_setup import effective_threads


class TorchEngine:
    """A MODNet module on a device at a precision, called through :func:`acceleration.make_runner`.

    Takes normalised input (numpy or tensor), returns float32 numpy. Every
    PyTorch entry point (the pipeline, inference.py, the service, benchmarks)
    builds one, so the device is made ready here, before the model reaches it
    (:func:`devices.activate`: current device, NPU internal formats off,
    ``strict_fp32`` when asked). Without ``strict_fp32`` a 910B runs fp32
    convolutions in HF32 and CUDA in TF32 (their defaults; fine for matting).
    Process-wide CPU settings (threads, allocator) are the entry point's job
    (``process_setup.setup_process``), not the engine's. ``capture``: how to
    capture graphs where the device has none of its own (a stand-in for tests);
    ``cache_dir``: where compiled packages are kept.

    With a fast path made per input shape (compiled, graph capture) the engine
    sees a handful of shapes: batches are padded up to :attr:`batch_sizes`
    (``acceleration.BATCH_SIZES`` until :meth:`warm_up` sets them) and larger
    ones are cut; :meth:`warm_up` prepares that set before any request.
    """

    name = "torch"
    fixed_size: Size | None = None  # any multiple of 32

    def __init__(self, model: nn.Module, device: torch.device, *, precision: str = "fp32",
                 strict_fp32: bool = False, compile: bool = False, graphs: str = "auto", threads: int = 0,
                 log: Callable[[str], None] = lambda m: None, capture: GraphFactory | None = None,
                 cache_dir: str = DEFAULT_COMPILE_CACHE) -> None:
        from modnet_npu.model.optimized import with_precision

        self.device = device
        self.precision = check_precision(precision)
        activated = devices.activate(device, strict_fp32=strict_fp32)
        for note in activated.notes:
            log(f"note: {note}")
        if precision == "bf16":  # after activate: asking the NPU initialises it, and options come first
            devices.check_bf16(device)
        self.model, self.dtype = with_precision(model.to(device).eval(), precision)
        # the weights' copy initialised the device: CANN has applied (or refused) the options by now
        self.settings = replace(activated, in_force=devices.read_back(device))
        self.runner = make_runner(self.model, device, compile=compile, graphs=graphs,
                                  threads=effective_threads(threads), cache_dir=cache_dir, log=log, capture=capture)
        self.runner.batch_sizes = BATCH_SIZES if self.runner.fixed_shapes else ()
        self.warm_sizes: tuple[tuple[int, int], ...] = ()

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes a batch is padded up to (the runner's: one place); () when any shape runs as is."""
        return self.runner.batch_sizes

    @property
    def fast_path(self) -> str:
        """The fast path's pieces, saying so when graph captures failed (``eager`` when none)."""
        return self.runner.describe

    @property
    def description(self) -> str:
        """The engine in words: device, precision, fast path, and the shape set prepared at warm-up."""
        ready = self.shape_set()
        return f"PyTorch on {self.device} ({self.precision}; {self.fast_path}{'; ' + ready if ready else ''})"

    def shape_set(self) -> str | None:
        """The shapes prepared at warm-up and what they cost, in words; None before a warm-up prepared any."""
        if not self.warm_sizes:
            return None
        sizes = ", ".join(f"{h}x{w}" for h, w in self.warm_sizes)
        memory, kind = self.runner.warm_up_memory or (None, "")
        cost = f"{sum(p.seconds for p in self.runner.prepared):.1f} s"
        if memory is not None:
            cost += f", {memory:+.0f} MB {kind}"
        return f"batches {','.join(map(str, self.batch_sizes))} at {sizes} prepared ({cost})"

    def fast_path_stats(self) -> FastPathStats:
        """Graph captures, replays and failures (with reasons), compilations, the shape set: what the fast
        path did so far."""
        return self.runner.stats()

    def device_settings(self) -> devices.DeviceSettings:
        """What :func:`devices.activate` set, with the options in force read back now."""
        return replace(self.settings, in_force=devices.read_back(self.device))

    def _forward(self, t: torch.Tensor) -> np.ndarray:
        t = t.to(self.device, self.dtype, non_blocking=True)
        return self.runner(t).float().cpu().numpy()

    def padded_batch(self, n: int, tail: tuple) -> int:
        """The batch ``n`` images of shape ``tail`` run at: the next of :attr:`batch_sizes`. When that one is
        not ready, a larger ready one where the alternative is a compilation (compiled, or sealed: nothing
        is prepared any more), and sealed with none ready, ``n`` itself (it then runs eagerly)."""
        bucket = next(b for b in self.batch_sizes if b >= n)
        ready = self.runner.prepared_batches(tail, self.dtype)
        if bucket in ready:
            return bucket
        larger = [b for b in ready if b >= n]
        if self.runner.sealed:
            return min(larger) if larger else n
        if self.runner.compiled is not None and larger:  # padding costs far less than compiling another shape
            return min(larger)
        return bucket

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """The model's output for ``x``. A fast path made per shape gets a handful of them: batches are cut
        to the largest of :attr:`batch_sizes` and padded up (rows of zeros, dropped from the answer)."""
        t = torch.as_tensor(x)
        if not self.runner.fixed_shapes:
            return self._forward(t)
        outs = []
        for chunk in t.split(self.batch_sizes[-1]):
            n = chunk.shape[0]
            b = self.padded_batch(n, tuple(chunk.shape[1:]))
            if b > n:
                chunk = torch.cat([chunk, chunk.new_zeros((b - n, *chunk.shape[1:]))])
            outs.append(self._forward(chunk)[:n])
        return np.concatenate(outs)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self(x)[:, 0]

    def prepare(self, x: np.ndarray | torch.Tensor) -> None:
        """Compile or capture ``x``'s shape now (before timing it): :meth:`acceleration.Runner.prepare`."""
        t = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
        self.runner.prepare(t.to(self.device, self.dtype))

    def warm_up(self, sizes: Iterable[tuple[int, int]], *, max_batch: int = BATCH_SIZES[-1],
                seal: bool = True) -> FastPathStats:
        """Make the engine ready for batches of up to ``max_batch`` images at each model input size.

        With a fast path made per shape (compiled, graph capture) every batch of
        ``acceleration.batch_set(max_batch)`` is compiled (or loaded from the cache)
        or captured at every size now, and ``seal`` then keeps any other shape from
        being compiled or captured later: a request never waits for a compiler,
        and an unforeseen shape runs eagerly (logged once). Otherwise the first
        forwards (one image, then two) run, off the request path. The set and what
        it cost are in :meth:`fast_path_stats` and :attr:`description`.
        """
        sizes = list(dict.fromkeys((int(h), int(w)) for h, w in sizes))
        fixed = self.runner.fixed_shapes
        batches = batch_set(max_batch) if fixed else tuple(sorted({1, min(2, max_batch)}))
        before = memory_now(self.device)
        for h, w in sizes:
            for b in batches:
                self.runner.prepare(torch.zeros((b, 3, h, w), dtype=self.dtype).to(self.device))
        if fixed:
            self.runner.batch_sizes, self.warm_sizes = batches, tuple(sizes)
            after = memory_now(self.device)
            memory = None if before[0] is None or after[0] is None else round(after[0] - before[0], 1)
            self.runner.warm_up_memory = (memory, after[1])
            if seal:
                self.runner.seal()
        return self.fast_path_stats()

    def close(self) -> None:
        self.runner.close()

    def to_device(self, x: np.ndarray) -> torch.Tensor:
        """``x`` on the device in the engine's input dtype (for :meth:`timed`)."""
        return torch.from_numpy(x).to(self.device, self.dtype)

    def timed(self, x: np.ndarray | torch.Tensor) -> float:
        """Milliseconds for one forward of an on-device tensor, synchronised."""
        if isinstance(x, np.ndarray):
            x = self.to_device(x)
        devices.synchronize(self.device)
        start = time.perf_counter()
        self.runner(x)
        devices.synchronize(self.device)
        return (time.perf_counter() - start) * 1000.0
