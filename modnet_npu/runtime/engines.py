"""The two inference engines behind one interface, for every tool of the project.

An engine takes normalised ``(N, 3, h, w)`` float32 input and returns
``(N, h, w)`` float32 alpha (:meth:`infer`); :meth:`timed` measures one
synchronised forward. ``fixed_size`` is the ``(h, w)`` it insists on (a static
ONNX graph on ONNX Runtime), else None.

* :class:`TorchEngine` — the converted PyTorch MODNet on a device at a precision,
  through the fast path of ``acceleration``.
* :class:`OrtEngine` — ONNX Runtime on the CPU, on the ONNX file itself.

Each has a ``description`` (the engine in words, for a user) and a ``fast_path``
(what speeds the forward up: the pieces of ``acceleration``, or ``onnxruntime``).

:func:`ort_session` is the one place an ONNX Runtime session is configured.
:func:`check_model` is the one model check of every path (local, Ray, service).
:func:`open_engine` builds either from a model file and ``options.EngineOptions``;
:func:`choose_backend` decides ``auto`` (with ``options.choose_engine``).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import replace
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from modnet_npu.errors import ModnetError
from modnet_npu.runtime import devices
from modnet_npu.runtime.acceleration import (BATCH_SIZES, DEFAULT_COMPILE_CACHE, FastPathStats, GraphFactory,
                                             batch_set, make_runner, memory_now)
from modnet_npu.runtime.options import (BACKEND_CHOICES, BACKENDS, EngineOptions, check_cpu_only,  # noqa: F401
                                        check_ort, choose_engine)
from modnet_npu.runtime.process_setup import effective_threads
from modnet_npu.matting.imaging import Size
from modnet_npu.model.precision import check as check_precision


class Engine(Protocol):
    name: str
    description: str  # the engine in words
    fast_path: str  # what speeds its forward up
    fixed_size: Size | None

    def infer(self, x: np.ndarray) -> np.ndarray: ...

    def timed(self, x: np.ndarray | torch.Tensor) -> float: ...


def default_threads(threads: int) -> int:
    """The thread count an engine uses: ``threads`` (clamped to this process's CPUs), or when 0 the CPUs
    other processes leave free now: the one policy of every tool (``process_setup.effective_threads``)."""
    return effective_threads(threads)


def check_model(path: str) -> None:
    """The model check of every path, local, Ray and service alike (``graph.contract.check_model``):
    torch-free, so the ONNX Runtime and OpenVINO paths start without building a PyTorch model.

    A truncated, random or non-MODNet file ends in one line (``ModnetError``)
    before any engine reads it: never ONNX Runtime's tracebacks, never a
    foreign network run as if it were MODNet.
    """
    from modnet_npu.graph.contract import check_model as check

    check(path)


# --------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------


def ort_session(path: str | bytes, threads: int = 0, *, optimization: str = "all"):
    """ONNX Runtime on the CPU with ``threads`` intra-op threads and spinning off.

    Spinning threads keep the cores busy after each run and would slow whatever
    runs next in this process (the PyTorch side in a comparison, the next
    request in the service), so they are off everywhere. ``optimization``
    ``"none"`` keeps every intermediate tensor of the graph (layer-by-layer
    comparison); ``path`` may be the serialised model itself.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = default_threads(threads)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 4  # fatal only: its errors reach the caller as exceptions, told in one line
    if optimization == "none":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's own types derive from Exception only
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise OrtLoadError(f"ONNX Runtime cannot load {_model_name(path)}: {_ort_reason(exc)}") from None


class OrtLoadError(ModnetError):
    """A model file ONNX Runtime refuses (an input declared float16, an unreleased opset ...): one line."""


class OrtRunError(ModnetError):
    """ONNX Runtime failed running the model on an input (its arena out of memory at a large size ...)."""


def _model_name(path: str | bytes) -> str:
    return "the model" if isinstance(path, bytes) else str(path)


def _ort_reason(exc: Exception) -> str:
    """ONNX Runtime's message without its error-code prefix and C++ source location."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).strip())
    text = re.sub(r"^Load model from .*? failed:", "", text)
    text = re.sub(r"/\S+:\d+ [^(]*\([^)]*\) ?", "", text)  # its C++ file, line and function
    return " ".join(text.split())  # one line


class OrtEngine:
    """ONNX Runtime on the CPU, on the ONNX file itself."""

    name = "ort"
    fast_path = "onnxruntime"

    def __init__(self, onnx_path: str, *, threads: int = 0, validate: bool = True) -> None:
        if validate:  # the one model check (graph/contract.py: torch-free, the same on every path)
            check_model(onnx_path)
        self.session = ort_session(onnx_path, threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        static_hw = isinstance(shape[2], int) and isinstance(shape[3], int)
        self.fixed_size: Size | None = (int(shape[2]), int(shape[3])) if static_hw else None
        self.fixed_batch = int(shape[0]) if isinstance(shape[0], int) else None
        self.description = "ONNX Runtime on the CPU"
        self.run_options = None  # onnxruntime.RunOptions for every run (the service shrinks the arena with it)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The graph's own output ``(N, 1, h, w)``; a fixed-batch graph takes a batch image by image."""
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            return np.concatenate([self.run(x[i : i + 1]) for i in range(x.shape[0])])
        try:
            return self.session.run(None, {self.input_name: x}, self.run_options)[0]
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise OrtRunError(f"ONNX Runtime failed at input {x.shape[2]}x{x.shape[3]}: {_ort_reason(exc)}") from None

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[:, 0]

    def timed(self, x: np.ndarray | torch.Tensor) -> float:
        x = x.numpy() if isinstance(x, torch.Tensor) else x
        start = time.perf_counter()
        self.run(x)
        return (time.perf_counter() - start) * 1000.0


# --------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------


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
                                  threads=default_threads(threads), cache_dir=cache_dir, log=log, capture=capture)
        self.batch_sizes = BATCH_SIZES if self.runner.fixed_shapes else ()
        self.runner.batch_sizes = self.batch_sizes
        self.warm_sizes: tuple[tuple[int, int], ...] = ()

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
            self.batch_sizes, self.warm_sizes = batches, tuple(sizes)
            self.runner.batch_sizes = batches
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


# --------------------------------------------------------------------------
# choosing and opening
# --------------------------------------------------------------------------


def _local_accelerator() -> tuple[str, str]:
    chosen = devices.select_device("auto")
    return chosen.type, "no accelerator found" if chosen.type == "cpu" else f"accelerator {chosen} found"


def choose_backend(backend: str, device: str, precision: str = "fp32") -> tuple[str, str]:
    """``auto``: PyTorch when an accelerator is there (or asked for), ONNX Runtime on a CPU-only machine.

    On a CPU, ONNX Runtime is the faster engine for MODNet (README, benchmark.py
    engines); on an accelerator, PyTorch is the one that uses it. Returns
    (backend, why); the decision is ``options.choose_engine``'s, asked about this machine.
    """
    choice = choose_engine(backend, device, precision, find_accelerator=_local_accelerator)
    return choice.backend, choice.why


def open_engine(backend: str, onnx_path: str, options: EngineOptions = EngineOptions(), *, validate: bool = True,
                log: Callable[[str], None] = lambda m: None) -> TorchEngine | OrtEngine:
    """An engine of kind ``backend`` (``torch`` or ``ort``, as chosen) on the model file at ``onnx_path``.

    Of ``options`` it reads what applies to the backend: device, precision,
    threads (both); model form, fast path and ``strict_fp32`` (torch).
    ``validate`` (ort): :func:`check_model` first (torch converts the file, which checks anyway).
    """
    if backend == "ort":
        check_ort(options.device, options.precision)
        return OrtEngine(onnx_path, threads=options.threads, validate=validate)
    if backend == "openvino":  # modnet_npu/runtime/openvino_engine.py (optional package, imported there)
        check_cpu_only(backend, options.device)
        from modnet_npu.runtime.openvino_engine import OpenVinoEngine

        return OpenVinoEngine(onnx_path, threads=options.threads, precision=check_precision(options.precision),
                              validate=validate)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    from modnet_npu.conversion.convert import build_torch_model_from_onnx

    target = devices.select_device(options.device)
    # on the CPU: TorchEngine readies the device first
    model = build_torch_model_from_onnx(onnx_path, optimize=options.model_form == "optimized")
    return TorchEngine(model, target, precision=options.precision, strict_fp32=options.strict_fp32,
                       compile=options.compile, graphs=options.graphs, threads=options.threads, log=log,
                       cache_dir=os.path.join(options.models_dir, ".compile-cache"))  # --models-dir's, as --help says
