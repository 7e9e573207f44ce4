"""The layer-by-layer figure: relative error per layer, inherited and local, on a log scale."""
from __future__ import annotations

import math
import os

from modnet_npu.fileio import atomic_path
from modnet_npu.proof.layerwise.plan import BACKBONE
from modnet_npu.proof.layerwise.report import LayerwiseReport

_FLOOR = 1e-12  # zero errors drawn here on the log scale


def _short(layer: str) -> str:
    return layer.replace(BACKBONE, "f.").replace(".layers.0", "")


def layerwise_figure(rep: LayerwiseReport, path: str | os.PathLike[str]) -> None:
    """Relative error per layer (inherited vs ORT, and local) on a log scale, written to ``path`` as PNG.

    Draws on a bare ``Figure`` with the Agg canvas rather than through pyplot:
    it needs no display, and it leaves a notebook's own backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(rep.rows)
    xs = list(range(n))
    fig = Figure(figsize=(max(8.0, 0.16 * n + 3), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, [max(r.rel, _FLOOR) for r in rep.rows], ".-", label="inherited: max|err| / max|ORT| vs ONNX Runtime")
    ax.plot(xs, [max(r.local_rel, _FLOOR) for r in rep.rows], ".-", label="local: float64 rerun on the device's input")
    ax.axhline(rep.threshold, color="red", linestyle="--", label=f"threshold {rep.threshold:g}")
    if rep.first_divergence is not None:
        i = next(i for i, r in enumerate(rep.rows) if r.layer == rep.first_divergence)
        ax.axvline(i, color="black", linewidth=1)
        right = i > 0.6 * n  # keep the label inside the axes
        ax.annotate(f"first divergence: {rep.first_divergence}", (i, rep.threshold), xytext=(-5 if right else 5, 10),
                    textcoords="offset points", fontsize=8, ha="right" if right else "left")
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("relative error (max abs / max |ORT tensor|)")
    step = max(1, math.ceil(n / 60))  # thin the labels so they stay readable
    ax.set_xticks(xs[::step])
    ax.set_xticklabels([_short(r.layer) for r in rep.rows][::step], rotation=90, fontsize=6)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
