"""``routes.png``: every timed run of every route beside ONNX Runtime CPU, with each route's parity verdict."""
from __future__ import annotations

import os

import numpy as np

from modnet_npu.routes.base import RoutesReport

ROUTES_FIGURE = "routes.png"


def routes_chart(report: RoutesReport):
    """Horizontal box plot per contender (each run a dot), the median and the parity verdict beside it."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = ["ort-cpu", *(r.name for r in report.routes)]
    labels = ["ONNX Runtime CPU (reference)",
              *(f"{r.name}\n{r.setup.precision}, parity {'PASS' if r.parity.passed else 'FAIL'}" for r in report.routes)]
    data = [np.asarray(report.times[n], float) for n in names]
    height = 1.6 + 0.9 * len(names)  # inches: 0.9 per contender, 0.6 above for the title, 1.0 below for the axis
    fig = Figure(figsize=(12, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.22, 1.0 / height, 0.62, 1 - 1.6 / height))
    major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
    sideways = {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}
    ax.boxplot(data, positions=range(1, len(data) + 1), widths=0.5, showfliers=False, **sideways)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.scatter(d, i + rng.uniform(-0.12, 0.12, d.size), s=10, zorder=3)
        ax.annotate(f"median {np.median(d):.2f} ms", (float(d.max()), i), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.set_yticks(range(1, len(data) + 1), labels=labels)
    ax.set_xlim(0, max(float(d.max()) for d in data) * 1.35)
    ax.set_xlabel(f"latency per image, batch 1 (ms; {report.timed_call.split(':')[0]})")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"MODNet routes at {report.size[0]}x{report.size[1]}, {report.runs} interleaved runs each"
                 + (" - machine busy, timings unreliable" if report.noise.get("noisy") else ""), fontsize=12)
    return fig


def write_routes_figure(report: RoutesReport, output_dir: str) -> list[str]:
    """Write ``routes.png`` into ``output_dir`` (atomically); the names written."""
    from modnet_npu.fileio import write_bytes
    from modnet_npu.proof.figures import png_bytes

    write_bytes(os.path.join(output_dir, ROUTES_FIGURE), png_bytes(routes_chart(report)))
    return [ROUTES_FIGURE]
