"""The pipeline's figures: ``comparison.png`` (input, both mattes, error map,
the parity verdict) and ``benchmark.png`` (latency distributions, batch
throughput, whether the machine was busy).

Pure: data in, a matplotlib :class:`~matplotlib.figure.Figure` out (no pyplot,
no global state); :func:`png_bytes` renders one, :func:`save_png` writes it
atomically, :func:`figure_text` lists its words (for tests).

The error map uses one fixed logarithmic scale, :data:`ERROR_RANGE`, with its
colour bar: the same error has the same colour in every run, so a failing
half-precision run does not look as calm as a passing one.
"""
from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import numpy as np

from modnet_npu.matting.imaging import to_uint8

ERROR_RANGE = (1e-6, 1.0)  # |error| of the heat-map's colour scale, log; below and above are clipped
ERROR_CMAP = "inferno"
ORT_COLOUR, TORCH_COLOUR = "#1c7ed6", "#d9480f"
WARN_COLOUR = "#c92a2a"
DPI = 100


def engine_names(device_type: str) -> tuple[str, str]:
    """The two engines' names as figures and tables show them."""
    return "ONNX Runtime CPU", f"PyTorch {device_type.upper()}"


def error_norm():
    """The heat-map's fixed colour normalisation (log, :data:`ERROR_RANGE`, clipped)."""
    from matplotlib.colors import LogNorm

    return LogNorm(*ERROR_RANGE, clip=True)


def error_colours(err: np.ndarray) -> np.ndarray:
    """RGBA in [0, 1] of errors as the heat-map paints them (the same mapping for every run)."""
    import matplotlib

    clipped = np.clip(np.asarray(err, dtype=np.float64), *ERROR_RANGE)
    return matplotlib.colormaps[ERROR_CMAP](error_norm()(clipped))


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_png(fig, path: str) -> None:
    """Write the figure as PNG atomically (complete or not at all)."""
    from modnet_npu.fileio import write_bytes

    write_bytes(path, png_bytes(fig))


def figure_text(fig) -> str:
    """Every piece of text in the figure, one per line (titles, labels, notes)."""
    from matplotlib.text import Text

    return "\n".join(t.get_text() for t in fig.findobj(Text) if t.get_text())


# --------------------------------------------------------------------------
# comparison.png
# --------------------------------------------------------------------------


def _verdict(accuracy) -> tuple[str, str]:
    """The headline and its colour: PASS / FAIL with the thresholds."""
    th = accuracy.thresholds
    verdict = "PASS" if accuracy.passed else "FAIL"
    text = (f"{verdict}: MAE {accuracy.mae:.2e} (< {th['mae']:g}), max error {accuracy.max_error:.2e} "
            f"(< {th['max_error']:g})")
    return text, ("#2b8a3e" if accuracy.passed else WARN_COLOUR)


def _comparison_lines(ort_name: str, dev_name: str, device: str, accuracy, synthetic: bool,
                      note: str | None) -> list[tuple[str, str, int]]:
    """The title lines (text, colour, font size): engines; verdict; generated model; note."""
    lines = [(f"MODNet parity: {ort_name} vs {dev_name}", "black", 15)]
    if accuracy is not None:
        text, colour = _verdict(accuracy)
        lines.append((f"{text}; precision {accuracy.precision}, device {device}", colour, 12))
    if synthetic:
        lines.append(("GENERATED MODEL (seeded weights) - mattes not meaningful", WARN_COLOUR, 12))
    if note:
        lines.append((note, "black", 11))
    return lines


def comparison_chart(image: np.ndarray, ort_matte: np.ndarray, dev_matte: np.ndarray, *, device: str,
                     accuracy=None, synthetic: bool = False, note: str | None = None):
    """Input, ONNX Runtime's matte, PyTorch's, and |error| on the fixed log scale with its colour bar.

    ``device``: where PyTorch ran (e.g. ``cpu``, ``npu:0``). ``accuracy``
    (:class:`report.Accuracy`): the verdict, MAE, max error and precision in the
    title. ``synthetic``: a red line says the model is generated and its mattes
    mean nothing. ``note``: a further line (e.g. which of several images is shown).
    """
    err = np.abs(ort_matte.astype(np.float64) - dev_matte.astype(np.float64))
    ort_name, dev_name = engine_names(device.split(":")[0])
    lines = _comparison_lines(ort_name, dev_name, device, accuracy, synthetic, note)
    fig = _new_figure(16, 5.2)
    axes = fig.subplots(1, 4, gridspec_kw={"left": 0.01, "right": 0.93, "top": 0.965 - 0.055 * len(lines),
                                           "bottom": 0.04, "wspace": 0.05})
    panels = [("input", image, {}),
              (f"{ort_name} matte", to_uint8(ort_matte), {"cmap": "gray", "vmin": 0, "vmax": 255}),
              (f"PyTorch matte on {device}", to_uint8(dev_matte), {"cmap": "gray", "vmin": 0, "vmax": 255})]
    for ax, (title, arr, kw) in zip(axes[:3], panels, strict=True):
        ax.imshow(arr, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=11)
        ax.set_axis_off()
    heat = axes[3].imshow(np.clip(err, *ERROR_RANGE), cmap=ERROR_CMAP, norm=error_norm(), interpolation="nearest")
    heat.set_gid("error-map")
    axes[3].set_title(f"|error|, log scale (max {err.max():.1e})", fontsize=11)
    axes[3].set_axis_off()
    box = axes[3].get_position()
    cax = fig.add_axes([0.94, box.y0, 0.012, box.height])
    fig.colorbar(heat, cax=cax, extend="min").set_label("|ONNX Runtime - PyTorch|")
    for i, (text, colour, size) in enumerate(lines):
        fig.text(0.5, 0.97 - 0.055 * i, text, ha="center", va="top", color=colour, fontsize=size,
                 fontweight="bold" if i else "normal")
    return fig


# --------------------------------------------------------------------------
# benchmark.png
# --------------------------------------------------------------------------


def _latency_panel(ax, times: Mapping[str, Sequence[float]], names: tuple[str, str]) -> None:
    """Box plot of every timed run per engine, each run a dot, the median written beside its box."""
    import matplotlib

    data = [np.asarray(times["ort"], float), np.asarray(times["torch"], float)]
    major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
    sideways = {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}
    box = ax.boxplot(data, **sideways, widths=0.5, patch_artist=True, showfliers=False,
                     medianprops={"color": "black", "linewidth": 2})
    rng = np.random.default_rng(0)
    for i, (d, colour) in enumerate(zip(data, (ORT_COLOUR, TORCH_COLOUR), strict=True)):
        box["boxes"][i].set(facecolor=colour, alpha=0.35)
        ax.scatter(d, i + 1 + rng.uniform(-0.12, 0.12, d.size), s=12, color=colour, zorder=3)
        ax.annotate(f"median {np.median(d):.1f} ms\n(p10-p90 {np.percentile(d, 10):.0f}-"
                    f"{np.percentile(d, 90):.0f})", (float(d.max()), i + 1), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.set_yticks([1, 2], labels=list(names))
    ax.set_xlabel("latency per image, batch 1 (ms)")
    right = max(float(d.max()) for d in data)
    ax.set_xlim(0, right * 1.45)
    ax.set_title("latency of every timed run", fontsize=11)
    ax.grid(axis="x", alpha=0.3)


def _throughput_panel(ax, throughput: Sequence, names: tuple[str, str]) -> None:
    """Images per second per batch size, both engines side by side, with a legend."""
    batches = [t.batch_size for t in throughput]
    pos = np.arange(len(batches))
    ort = [t.ort_images_per_s for t in throughput]
    dev = [t.torch_images_per_s for t in throughput]
    bars_o = ax.bar(pos - 0.2, ort, 0.4, color=ORT_COLOUR, label=names[0])
    bars_t = ax.bar(pos + 0.2, dev, 0.4, color=TORCH_COLOUR, label=names[1])
    for bars in (bars_o, bars_t):
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    labels = [f"batch {b}" + ("\n(ORT one by one)" if t.ort_mode == "sequential" and b > 1 else "")
              for b, t in zip(batches, throughput, strict=True)]
    ax.set_xticks(pos, labels=labels)
    ax.set_ylabel("images / s")
    ax.set_ylim(0, max(ort + dev + [1e-9]) * 1.35)
    ax.set_title("throughput", fontsize=11)
    ax.legend(loc="upper center", ncol=2, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def benchmark_chart(performance, times: Mapping[str, Sequence[float]], title: str):
    """Latency distribution of each engine (``times``: every timed run, keys ``ort`` and ``torch``, ms),
    batch throughput (``performance.throughput``), and a red note when ``performance.extra["noisy"]``."""
    names = engine_names(performance.device_type)
    fig = _new_figure(14, 5)
    ax_lat, ax_thr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1], "left": 0.13, "right": 0.98,
                                                     "top": 0.76, "bottom": 0.13, "wspace": 0.18})
    _latency_panel(ax_lat, times, names)
    _throughput_panel(ax_thr, performance.throughput, names)
    ratio = performance.speedup_median
    fig.text(0.5, 0.97, title, ha="center", va="top", fontsize=14)
    fig.text(0.5, 0.905, f"{names[1]} runs at x{ratio:.2f} the speed of {names[0]} (median; above 1: faster); "
             f"{performance.threads} CPU thread(s), model form {performance.model_form}, "
             f"fast path {performance.fast_path}", ha="center", va="top", fontsize=10)
    extra = performance.extra
    if extra.get("noisy"):
        others = extra.get("other_cpu_load")
        detail = f"other processes used {others:.1f} CPUs, " if isinstance(others, (int, float)) else ""
        load = extra.get("load_average", math.nan)
        fig.text(0.5, 0.855, f"machine busy - timings unreliable ({detail}load average {load:.1f})",
                 ha="center", va="top", color=WARN_COLOUR, fontsize=12, fontweight="bold")
    return fig
