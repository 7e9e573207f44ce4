"""OpenVINO on the CPU, on the ONNX file itself: the third engine (``--backend openvino``).

The same interface as the other engines (``name``, ``description``,
``fixed_size``, :meth:`OpenVinoEngine.infer`, :meth:`OpenVinoEngine.timed`):
normalised ``(N, 3, h, w)`` float32 in, ``(N, h, w)`` float32 alpha out.

Precision is explicit. OpenVINO's CPU plugin runs a float32 model in bfloat16
by default wherever the CPU has bf16 instructions (AVX512_BF16 or AMX: recent
Xeons and EPYCs), which moves the matte by up to 0.9 at soft edges on the real
portrait (see ``docs`` / the peers benchmark). ``fp32`` therefore sets
``INFERENCE_PRECISION_HINT`` to ``f32`` and reads it back from the compiled
model; ``bf16`` and ``fp16`` ask for those hints and report what is in force.

The module imports neither torch nor the model code: the OpenVINO path starts
without them. ``openvino`` itself is imported where used, with an install hint.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from modnet_npu.errors import ModnetError

# the project's precision names -> OpenVINO's INFERENCE_PRECISION_HINT values
OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
INSTALL_HINT = "pip install openvino (or: pip install -r requirements-bench.txt)"


class OpenVinoUnavailable(ModnetError, ImportError):
    """``openvino`` is not installed."""


class OpenVinoModelError(ModnetError, ValueError):
    """The file is not a model OpenVINO can run as MODNet (one ``(N, 3, h, w)`` input, ``(N, 1, h, w)`` output)."""


class PrecisionNotInForce(ModnetError, RuntimeError):
    """The compiled model runs at another precision than the one asked for."""


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise OpenVinoUnavailable(f"--backend openvino needs the openvino package: {INSTALL_HINT}") from None
    return openvino


def available() -> bool:
    """Whether ``openvino`` can be imported (without importing it when it is already known absent)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _dims(partial_shape: Any) -> list[int | None]:
    return [int(d.get_length()) if d.is_static else None for d in partial_shape]


def _check_contract(model: Any, path: str) -> tuple[list[int | None], str]:
    """The input's dims and name, once the graph is MODNet's contract; OpenVinoModelError otherwise."""
    if len(model.inputs) != 1 or len(model.outputs) < 1:
        raise OpenVinoModelError(f"{path}: not a matting model: {len(model.inputs)} inputs, "
                                 f"{len(model.outputs)} outputs (MODNet has one image input and a matte output)")
    dims = _dims(model.inputs[0].get_partial_shape())
    out = _dims(model.outputs[0].get_partial_shape())
    if len(dims) != 4 or dims[1] not in (3, None) or len(out) != 4 or out[1] not in (1, None):
        raise OpenVinoModelError(f"{path}: not a matting model: input {dims}, output {out} "
                                 f"(MODNet takes (N, 3, h, w) and gives (N, 1, h, w))")
    return dims, model.inputs[0].get_any_name()


def _read(core: Any, onnx_path: str, validate: bool) -> Any:
    """The model, its file checked first (``validate``; off where the caller checked it already) by the
    project's one model check (``graph.contract.check_model``: safe reader, external data included)."""
    from modnet_npu.graph.contract import check_model

    if validate:  # OnnxReadError / NotAMattingModel, one line, for a missing, truncated, hostile or non-MODNet file
        check_model(onnx_path)
    try:
        return core.read_model(onnx_path)
    except Exception as exc:  # OpenVINO's frontend raises plain RuntimeErrors with multi-line text
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OpenVinoModelError(f"{onnx_path}: OpenVINO cannot read it: {reason}") from None


class OpenVinoEngine:
    """OpenVINO's CPU plugin on the ONNX file, at an explicit precision (fp32 by default)."""

    name = "openvino"

    def __init__(self, onnx_path: str, *, threads: int = 0, precision: str = "fp32",
                 pinning: bool | None = None, validate: bool = True) -> None:
        if precision not in OV_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} for openvino; choose from {', '.join(OV_PRECISIONS)}")
        ov = _openvino()
        core = ov.Core()
        model = _read(core, onnx_path, validate)
        dims, self.input_name = _check_contract(model, onnx_path)
        self.fixed_size = (dims[2], dims[3]) if dims[2] is not None and dims[3] is not None else None
        self.fixed_batch = dims[0]
        self.precision = precision
        from modnet_npu.runtime.process_setup import effective_threads

        self.threads = effective_threads(threads)  # 0: the CPUs others leave free, as every engine
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision],
                                  "INFERENCE_NUM_THREADS": self.threads,
                                  # one request at a time, all threads on it (the service batches instead)
                                  "PERFORMANCE_HINT": "LATENCY"}
        if pinning is not None:
            config["ENABLE_CPU_PINNING"] = bool(pinning)
        # the dynamic-shape graph is compiled once; measured as fast as a static reshape per size
        self.compiled = core.compile_model(model, "CPU", config)
        # read back: on a CPU without fp16 arithmetic an f16 hint runs bf16, and fp32 must be f32
        self.precision_in_force = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if precision == "fp32" and self.precision_in_force != "f32":
            raise PrecisionNotInForce(f"openvino: asked for f32, the compiled model runs {self.precision_in_force}")
        self._local = threading.local()
        self.description = (f"OpenVINO {ov.get_version().split('-')[0]} on the CPU "
                            f"({precision}: {self.precision_in_force} in force, {self.threads} threads)")

    def _request(self) -> Any:
        # an infer request is not thread-safe: one per calling thread
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, x: np.ndarray) -> np.ndarray:
        """The graph's own output ``(N, 1, h, w)``; a fixed-batch graph takes a batch image by image."""
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            return np.concatenate([self.run(x[i : i + 1]) for i in range(x.shape[0])])
        x = np.ascontiguousarray(x, dtype=np.float32)
        result = self._request().infer({0: x})
        return np.array(result[0], dtype=np.float32, copy=True)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[:, 0]

    def timed(self, x: Any) -> float:
        """Milliseconds for one forward (a torch tensor is accepted and read as numpy)."""
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        start = time.perf_counter()
        self.run(x)
        return (time.perf_counter() - start) * 1000.0

