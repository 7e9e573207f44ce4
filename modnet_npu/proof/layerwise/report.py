"""What the layer-by-layer comparison gives back: one row per boundary, two verdicts, one error type."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from modnet_npu.errors import ModnetError
from modnet_npu.proof.layerwise.fp16 import FP16_MAX, FP16_MIN_NORMAL, Fp16Range


class LayerwiseError(ModnetError, ValueError):
    """The input, model or options cannot be compared layer by layer; one line saying why."""


@dataclass(frozen=True)
class LayerRow:
    layer: str  # MODNet layer name (official module name), a stage, a branch or "matte"
    onnx_node: str  # the ONNX node producing the compared tensor
    shape: tuple[int, ...]
    max_abs: float  # max |PyTorch - ONNX Runtime|
    mean_abs: float
    rel: float  # max_abs / max |ONNX Runtime tensor|
    cosine: float
    local_max_abs: float  # max |float64 reference of this layer on the device's input - device output|
    local_rel: float  # local_max_abs / max |ONNX Runtime tensor|, comparable with rel
    fp16: Fp16Range  # what float16 would make of the output (and of the layer's InstanceNorm sums)


def _finite(v: object) -> object:
    """``v`` with every non-finite float, however deeply nested, as None (JSON has no inf or nan)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


@dataclass(frozen=True)
class LayerwiseReport:
    rows: tuple[LayerRow, ...]  # in execution order
    skipped: tuple[tuple[str, str], ...]  # (layer, reason)
    first_divergence: str | None
    worst_local: str | None
    threshold: float
    layers_compared: int

    @property
    def fp16_flagged(self) -> tuple[str, ...]:
        """The layers whose values float16 would overflow or lose, in execution order."""
        return tuple(r.layer for r in self.rows if r.fp16.flagged)

    def to_dict(self) -> dict:
        """JSON-ready: every row, the skipped layers, the two verdicts and the fp16 flags (non-finite as None)."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["fp16"]["flagged"] = r.fp16.flagged
            rows.append(_finite(d))
        return {
            "threshold": self.threshold,
            "layers_compared": self.layers_compared,
            "first_divergence": self.first_divergence,
            "worst_local": self.worst_local,
            "fp16": {"max": FP16_MAX, "min_normal": FP16_MIN_NORMAL, "flagged": list(self.fp16_flagged)},
            "rows": rows,
            "skipped": [{"layer": layer, "reason": reason} for layer, reason in self.skipped],
        }

    def worst_table(self, n: int = 10) -> str:
        """The ``n`` rows with the largest relative error, as a markdown table."""
        worst = sorted(self.rows, key=lambda r: -severity(r.rel))[: max(n, 0)]
        lines = [
            "| layer | ONNX node | shape | max abs | mean abs | rel | cosine | local max abs |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in worst:
            flag = " **!**" if severity(r.rel) > self.threshold else ""
            lines.append(
                f"| {r.layer}{flag} | {r.onnx_node} | {'x'.join(map(str, r.shape))} | {r.max_abs:.2e} | "
                f"{r.mean_abs:.2e} | {r.rel:.2e} | {r.cosine:.6f} | {r.local_max_abs:.2e} |"
            )
        return "\n".join(lines)


def severity(v: float) -> float:
    # NaN (an overflow in half precision, say) is the worst possible value, not an incomparable one
    return math.inf if math.isnan(v) else v


def verdicts(rows: Sequence[LayerRow], threshold: float) -> tuple[str | None, str | None]:
    first = next((r.layer for r in rows if severity(r.rel) > threshold), None)
    worst: LayerRow | None = None
    for r in rows:  # strict > : ties stay with the earlier row
        if worst is None or severity(r.local_rel) > severity(worst.local_rel):
            worst = r
    return first, worst.layer if worst else None
