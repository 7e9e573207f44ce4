"""What each PyTorch-side precision means: its dtype and the parity bounds it is held to.

One table, read by the model form (which parts run in half precision), the
engines, the pipeline's verdict and the layer-by-layer comparison. The names and
bounds are plain data, importable without torch (the engine options parse
``--precision`` before torch loads); :func:`dtype` imports torch when asked.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch's names

# Parity MAE bound on the final matte, per precision: fp32 must be a faithful port
# (~1e-5 measured); the half-precision bounds are the fast path's targets.
MAE_THRESHOLDS: dict[str, float] = {"fp32": 1e-3, "fp16": 2e-3, "bf16": 1e-2}
MAX_ERROR_THRESHOLD = 5e-2
# Layer-by-layer: the relative error (max abs error / max |reference|) above which a
# layer has diverged. fp32 leaves room for the ~2x-per-block growth of rounding
# through the backbone (7.4e-5 measured at the deepest block of the generated model).
LAYER_THRESHOLDS: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def check(precision: str) -> str:
    """``precision`` itself, or ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


def dtype(precision: str) -> "torch.dtype":
    """The torch dtype of ``precision`` (``fp32`` -> ``torch.float32`` ...)."""
    import torch

    return getattr(torch, _DTYPES[check(precision)])
