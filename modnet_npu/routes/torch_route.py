"""The ``torch`` route: the pipeline's own :class:`~modnet_npu.runtime.torch_engine.TorchEngine`, adapted.

Nothing is built here: the engine (converted model, device, precision, fast
path) is the one the pipeline made, parity-checked and benchmarked. The route
times it the way the other routes are timed (host array in, host array out,
so the copies to and from the device count as they do for ONNX Runtime and
the .om), and takes its parity from the pipeline's own cases.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from modnet_npu.routes.base import FirstRun, RouteSetup


class TorchRoute:
    name = "torch"

    def __init__(self, engine: Any, *, shape: tuple[int, ...]) -> None:
        self.engine = engine
        start = time.perf_counter()
        engine(np.zeros(shape, np.float32))  # the first call at this shape: capture or compilation happen here
        self.first_call_ms = (time.perf_counter() - start) * 1000.0

    def call(self, x: np.ndarray) -> object:
        return self.engine(x)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.engine.infer(x)

    def setup(self) -> RouteSetup:
        import torch

        from modnet_npu.runtime.devices import cann_version

        e = self.engine
        settings = e.device_settings().to_dict()
        npu = e.device.type == "npu"
        versions = {"torch": torch.__version__}
        if npu:
            import torch_npu

            versions |= {"torch_npu": getattr(torch_npu, "__version__", None), "cann": cann_version()}
        in_force = settings.get("in_force", {})
        modes = [f"{k}={v}" for k, v in in_force.items() if "PRECISION" in k or "HF32" in k or "tf32" in k]
        return RouteSetup(runtime=f"PyTorch {torch.__version__} on {e.device} ({e.fast_path})", versions=versions,
                          device=str(e.device), precision=e.precision,
                          precision_mode=", ".join(modes) or f"{e.precision} as PyTorch computes it on {e.device}",
                          options=settings)

    def first_run(self) -> FirstRun:
        return FirstRun(first_call_ms=self.first_call_ms,
                        note="first call at the benchmark shape, host to host (graph capture or compile included)")

    def close(self) -> None:
        """The pipeline owns the engine and closes it."""
