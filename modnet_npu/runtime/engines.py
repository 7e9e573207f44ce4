"""The inference engines behind one interface, for every tool of the project.

An engine takes normalised ``(N, 3, h, w)`` float32 input and returns
``(N, h, w)`` float32 alpha (:meth:`infer`); :meth:`timed` measures one
synchronised forward. ``fixed_size`` is the ``(h, w)`` it insists on (a static
ONNX graph on ONNX Runtime), else None.

* ``torch_engine.TorchEngine`` — the converted PyTorch MODNet on a device at a
  precision, through the fast path of ``acceleration``.
* :class:`OrtEngine` — ONNX Runtime on the CPU, on the ONNX file itself.
* ``openvino_engine.OpenVinoEngine`` — OpenVINO on the CPU (optional package).

Each has a ``description`` (the engine in words, for a user) and a ``fast_path``
(what speeds the forward up: the pieces of ``acceleration``, or ``onnxruntime``).

:func:`ort_session` is the one place an ONNX Runtime session is configured.
:func:`check_model` is the one model check of every path (local, Ray, service).
:func:`open_engine` builds one from a model file and ``options.EngineOptions``;
:func:`choose_backend` decides ``auto`` (with ``options.choose_engine``).

Nothing here imports torch: the ONNX Runtime and OpenVINO paths start without it
(``import torch`` alone takes seconds); :func:`open_engine` imports the PyTorch
engine for the torch backend only.
"""
from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from modnet_npu.errors import ModnetError
from modnet_npu.runtime import devices
from modnet_npu.runtime.options import (BACKEND_CHOICES, BACKENDS, EngineOptions, check_cpu_only,  # noqa: F401
                                        check_ort, choose_engine, compile_cache_dir)
from modnet_npu.runtime.process_setup import apply_torch_threads, effective_threads
from modnet_npu.matting.imaging import Size
from modnet_npu.model.precision import check as check_precision

if TYPE_CHECKING:
    from modnet_npu.runtime.openvino_engine import OpenVinoEngine
    from modnet_npu.runtime.torch_engine import TorchEngine


class Engine(Protocol):
    name: str
    description: str  # the engine in words
    fast_path: str  # what speeds its forward up
    fixed_size: Size | None

    def infer(self, x: np.ndarray) -> np.ndarray: ...

    def timed(self, x: Any) -> float: ...  # numpy, or a tensor the engine takes (TorchEngine: on its device)


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
        # ONNX Runtime's arena keeps what its largest forward took (growing by powers of two). A forward
        # of more model input pixels than this (batch x height x width) hands its arena's free memory
        # back afterwards; None: never (a one-off run). The service sets it (service/core.py).
        self.shrink_arena_above: int | None = None
        self._shrink = None  # its onnxruntime.RunOptions, made on first use

    def run(self, x: np.ndarray) -> np.ndarray:
        """The graph's own output ``(N, 1, h, w)``; a fixed-batch graph takes a batch image by image."""
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            return np.concatenate([self.run(x[i : i + 1]) for i in range(x.shape[0])])
        try:
            return self.session.run(None, {self.input_name: x}, self._run_options(x))[0]
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise OrtRunError(f"ONNX Runtime failed at input {x.shape[2]}x{x.shape[3]}: {_ort_reason(exc)}") from None

    def _run_options(self, x: np.ndarray):
        """The run's options: arena shrinkage after a forward larger than ``shrink_arena_above``, else None."""
        if self.shrink_arena_above is None or x.shape[0] * x.shape[2] * x.shape[3] <= self.shrink_arena_above:
            return None
        if self._shrink is None:
            import onnxruntime as ort

            self._shrink = ort.RunOptions()
            self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return self._shrink

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[:, 0]

    def timed(self, x: Any) -> float:
        """Milliseconds for one forward (a CPU torch tensor is accepted and read as numpy, without importing torch)."""
        x = x.numpy() if hasattr(x, "numpy") else x
        start = time.perf_counter()
        self.run(x)
        return (time.perf_counter() - start) * 1000.0


# --------------------------------------------------------------------------
# choosing and opening
# --------------------------------------------------------------------------


def choose_backend(backend: str, device: str, precision: str = "fp32") -> tuple[str, str]:
    """``auto``: PyTorch when an accelerator is there (or asked for), ONNX Runtime on a CPU-only machine.

    On a CPU, ONNX Runtime is the faster engine for MODNet (README, benchmark.py
    engines); on an accelerator, PyTorch is the one that uses it. Returns
    (backend, why); the decision is ``options.choose_engine``'s, asked about this machine
    (``devices.find_accelerator``: without importing torch where no accelerator can be there).
    """
    choice = choose_engine(backend, device, precision, find_accelerator=devices.find_accelerator)
    return choice.backend, choice.why


def open_engine(backend: str, onnx_path: str, options: EngineOptions = EngineOptions(), *, validate: bool = True,
                log: Callable[[str], None] = lambda m: None) -> TorchEngine | OrtEngine | OpenVinoEngine:
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
    apply_torch_threads()  # the entry point's thread count, where it did not load torch for it (setup_process)
    from modnet_npu.conversion.convert import build_torch_model_from_onnx
    from modnet_npu.runtime.torch_engine import TorchEngine

    target = devices.select_device(options.device)
    # on the CPU: TorchEngine readies the device first
    model = build_torch_model_from_onnx(onnx_path, optimize=options.model_form == "optimized")
    return TorchEngine(model, target, precision=options.precision, strict_fp32=options.strict_fp32,
                       compile=options.compile, graphs=options.graphs, threads=options.threads, log=log,
                       cache_dir=compile_cache_dir(options.models_dir))  # --models-dir's, as --help says
