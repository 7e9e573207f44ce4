"""What float16 would make of each layer: its output's range, and its InstanceNorm's sums.

Runtimes that compute in fp16 by default (ATC's ``force_fp16``, ONNX Runtime's
CANN provider without a precision mode) hold every activation, and often every
accumulator, in fp16. Two things go wrong there, and both can be read off a
float32 run before anyone compiles anything:

* an *output* larger than fp16's largest finite value (65504) becomes inf; one
  whose every value is below fp16's smallest normal (2**-14) keeps fewer than
  11 significant bits, and below 2**-25 rounds to zero;
* an *InstanceNorm* (MODNet's IBNorm sends half its channels through one) sums
  each image's channel over H x W positions: Σx for the mean and Σx² for the
  variance, as a one-pass accumulator holds them. A sum beyond 65504 is inf,
  and the mean and variance with it; and once the average term Σx²/count is
  under half the fp16 spacing at the sum (at 65504 for a sum beyond it), a
  running fp16 sum stops growing short of it (the terms are *absorbed*). Both
  grow with the image size.

The sums are measured where the layer-by-layer comparison already reruns each
layer in float64 from the device's own input (:mod:`.sides`), so they are the
sums this input gives, not a bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from modnet_npu.model.modnet import IBNorm

FP16_MAX = 65504.0  # largest finite float16
FP16_MIN_NORMAL = 2.0 ** -14  # smallest normal float16: below it, fewer significant bits


@dataclass(frozen=True)
class InstanceNormSums:
    """One InstanceNorm's per-image, per-channel sums, as an fp16 accumulator would have to hold them."""

    module: str  # the IBNorm whose instance half this is
    count: int  # values summed per image and channel (H x W)
    max_abs_sum: float  # largest |Σ x|
    max_sum_squares: float  # largest Σ x²
    overflow: bool  # some sum is beyond 65504: inf in fp16
    absorbed: bool  # some Σ x²'s average term is under half fp16's spacing at that sum (at 65504 if beyond)


@dataclass(frozen=True)
class Fp16Range:
    max_magnitude: float  # largest |value| of the layer's output (ONNX Runtime's tensor)
    overflow: bool  # max_magnitude > 65504
    underflow: bool  # 0 < max_magnitude < 2**-14: every value subnormal in fp16
    instance_norm: InstanceNormSums | None = None  # the layer's InstanceNorm, if it has one

    @property
    def flagged(self) -> bool:
        """Whether fp16 would overflow or lose this layer's values."""
        sums = self.instance_norm
        return self.overflow or self.underflow or (sums is not None and (sums.overflow or sums.absorbed))


def peak(values: np.ndarray) -> float:
    """Largest magnitude in ``values`` (0 for an empty array), without an ``abs`` copy."""
    if values.size == 0:
        return 0.0
    return max(-float(values.min()), float(values.max()))


def output_range(max_magnitude: float, instance_norm: InstanceNormSums | None = None) -> Fp16Range:
    return Fp16Range(max_magnitude, max_magnitude > FP16_MAX, 0 < max_magnitude < FP16_MIN_NORMAL, instance_norm)


def fp16_spacing(values: np.ndarray) -> np.ndarray:
    """The gap between consecutive float16 numbers at each of ``values`` (positive, at most 65504)."""
    # v = m * 2**e with m in [0.5, 1): 10 fraction bits give a gap of 2**(e - 11); subnormals 2**-24
    _, exponent = np.frexp(values)
    return np.maximum(np.ldexp(1.0, exponent - 11), 2.0 ** -24)


def instance_norm_sums(module: str, x: torch.Tensor) -> InstanceNormSums:
    """The sums an InstanceNorm over ``x`` ([N, C, H, W], the instance-normalised channels) accumulates."""
    x64 = x.detach().to("cpu", torch.float64)
    count = int(x64.shape[2] * x64.shape[3])
    s1 = x64.sum((2, 3)).abs().reshape(-1).numpy()
    s2 = x64.square().sum((2, 3)).reshape(-1).numpy()
    overflow = bool(np.any(s1 > FP16_MAX) or np.any(s2 > FP16_MAX))
    s2 = s2[s2 > 0]
    # the spacing where the running sum ends, or where fp16 ends for a sum beyond it
    spacing = fp16_spacing(np.minimum(s2, FP16_MAX))
    absorbed = bool(np.any(s2 / count < spacing / 2))
    return InstanceNormSums(module, count, float(s1.max(initial=0.0)), float(s2.max(initial=0.0)), overflow,
                            absorbed)


class SumRecorder:
    """Records the InstanceNorm sums of every IBNorm of ``model`` as it runs; :meth:`take` hands them over.

    Used as a context manager around the float64 local reruns: the hooks are
    removed on exit.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.found: list[InstanceNormSums] = []
        self._hooks: list = []

    def _hook(self, name: str):
        def record(module: IBNorm, inputs: tuple) -> None:
            self.found.append(instance_norm_sums(name, inputs[0][:, module.bnorm_channels:]))
        return record

    def __enter__(self) -> SumRecorder:
        for name, module in self.model.named_modules():
            if isinstance(module, IBNorm):
                self._hooks.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def take(self) -> InstanceNormSums | None:
        """The sums recorded since the last call (a layer's chain holds at most one IBNorm), or None."""
        found, self.found = self.found, []
        return found[-1] if found else None
