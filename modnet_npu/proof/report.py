"""The evaluation report: its dataclasses, the metrics that fill them, and the
two ways it is shown (``evaluation_report.json`` and the printed summary).

The report is built once from frozen dataclasses; :meth:`Report.to_dict` gives
the JSON schema documented in README.md (a public interface), and
:func:`summary_table` prints from the dataclasses themselves.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from modnet_npu.runtime.devices import Environment

# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorMetrics:
    mae: float
    mse: float
    psnr_db: float
    max_error: float
    pct_pixels_err_lt_1pct: float
    pct_pixels_err_lt_0_5pct: float


def error_metrics(a: np.ndarray, b: np.ndarray) -> ErrorMetrics:
    """Errors between two mattes in [0, 1]. PSNR with peak 1; inf when identical."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float(np.mean(d**2))
    return ErrorMetrics(
        mae=float(d.mean()),
        mse=mse,
        psnr_db=float("inf") if mse == 0 else float(10 * math.log10(1.0 / mse)),
        max_error=float(d.max()),
        pct_pixels_err_lt_1pct=float(100.0 * np.mean(d < 0.01)),
        pct_pixels_err_lt_0_5pct=float(100.0 * np.mean(d < 0.005)),
    )


@dataclass(frozen=True)
class LatencyStats:
    mean_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    fps: float
    runs: int


def latency_stats(times_ms: Sequence[float]) -> LatencyStats:
    t = np.asarray(times_ms, dtype=np.float64)
    mean = float(t.mean())
    return LatencyStats(
        mean_ms=mean,
        median_ms=float(np.median(t)),
        p90_ms=float(np.percentile(t, 90)),
        p99_ms=float(np.percentile(t, 99)),
        min_ms=float(t.min()),
        max_ms=float(t.max()),
        std_ms=float(t.std()),
        fps=1000.0 / mean if mean > 0 else float("inf"),
        runs=int(t.size),
    )


# --------------------------------------------------------------------------
# the report's sections
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    source: str
    path: str
    sha256: str
    opset: int
    num_weight_tensors: int
    num_parameters: int
    input_shape: list
    input_name: str
    output_name: str
    static_input: bool
    gmacs: float
    method: str | None
    warning: str | None
    download_attempts: list[str]
    package: str | None = None  # method package_index: the wheel ("name==version") the file came out of
    member: str | None = None  # ... and its path inside the wheel


@dataclass(frozen=True)
class InputInfo:
    path: str
    original_size: list[int]
    model_size: list[int]


@dataclass(frozen=True)
class ConversionInfo:
    layers_placed: int
    folded_batchnorms: int
    source_tensors_used: int
    leftover_tensors: list[str]


@dataclass(frozen=True)
class Accuracy(ErrorMetrics):
    """The float mattes' errors, flat, plus the 8-bit ones and the verdict."""

    png: ErrorMetrics
    thresholds: dict[str, float]
    passed: bool
    precision: str
    device_settings: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)  # further sections (layerwise, per_image ...)


@dataclass(frozen=True)
class Throughput:
    batch_size: int
    torch_images_per_s: float
    ort_images_per_s: float
    ort_mode: str  # "batched" or "sequential" (a static batch-1 graph), see ort_batch_mode


def ort_batch_mode(fixed_batch: int | None, batch: int) -> str:
    """How ONNX Runtime took a batch of ``batch``: ``"batched"`` (one call) or ``"sequential"``.

    A graph with a fixed batch of 1 takes every batch image by image, batch 1
    included: it cannot batch, so it is never labelled "batched". A graph fixed
    at another batch is "batched" only at that batch (else one image per call).
    """
    if fixed_batch is None:
        return "batched"
    return "batched" if fixed_batch == batch and fixed_batch > 1 else "sequential"


@dataclass(frozen=True)
class Performance:
    ort_cpu: LatencyStats
    torch: LatencyStats
    device_type: str  # names the JSON key torch_<device_type>
    throughput: list[Throughput]
    threads: int
    model_form: str
    fast_path: str
    operators: dict[str, dict[str, int]]
    extra: dict[str, Any] = field(default_factory=dict)  # further figures (noise, fast-path counters ...)

    @property
    def torch_key(self) -> str:
        return f"torch_{self.device_type}"

    @property
    def speedup_mean(self) -> float:
        """ORT time / PyTorch time: above 1 means PyTorch is faster."""
        return self.ort_cpu.mean_ms / self.torch.mean_ms

    @property
    def speedup_median(self) -> float:
        return self.ort_cpu.median_ms / self.torch.median_ms


@dataclass(frozen=True)
class Memory:
    device_peak_mb: float | None
    process_rss_mb: float
    process_peak_rss_mb: float


def memory(device_peak_mb: float | None, rss_mb: float, peak_rss_mb: float) -> Memory:
    """The memory section, its peak never below the current RSS.

    The two are read at different moments and, on Linux 6.16 and later, by
    different counters: ``/proc/self/statm`` sums the per-CPU RSS counters
    exactly, while ``getrusage``'s ``ru_maxrss`` (KiB, correctly converted) takes
    their approximate value, up to some 64 pages per CPU short. At the end of a
    run the process sits at its peak (the allocator keeps its heap), so the
    "peak" came out a fraction of a MB below the current RSS in 22 of 23 reports.
    """
    return Memory(device_peak_mb, rss_mb, max(peak_rss_mb, rss_mb))


@dataclass(frozen=True)
class Report:
    model: ModelInfo
    environment: Environment
    input: InputInfo
    conversion: ConversionInfo
    accuracy: Accuracy
    performance: Performance
    memory: Memory
    outputs: list[str]
    timestamp: str
    duration_s: float
    routes: Any = None  # modnet_npu.routes.RoutesReport when routes beyond torch ran (--routes)

    def to_dict(self) -> dict:
        """The documented JSON schema (``evaluation_report.json``), JSON-safe."""
        acc = asdict(self.accuracy)
        acc.update(acc.pop("extra"))
        p = self.performance
        perf = {
            "ort_cpu": asdict(p.ort_cpu),
            p.torch_key: asdict(p.torch),
            "throughput": [asdict(t) for t in p.throughput],
            "speedup_mean": p.speedup_mean,
            "speedup_median": p.speedup_median,
            "threads": p.threads,
            "model_form": p.model_form,
            "fast_path": p.fast_path,
            "operators": p.operators,
            "interleaved": True,
            **p.extra,
        }
        out = {
            "model": asdict(self.model),
            "environment": asdict(self.environment),
            "input": asdict(self.input),
            "conversion": asdict(self.conversion),
            "accuracy": acc,
            "performance": perf,
            "memory": asdict(self.memory),
            "outputs": list(self.outputs),
            "timestamp": self.timestamp,
            "duration_s": self.duration_s,
        }
        if self.routes is not None:
            out["routes"] = self.routes.to_dict()
        return jsonable(out)


def jsonable(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings a reader can still parse."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    return obj


# --------------------------------------------------------------------------
# the printed summary
# --------------------------------------------------------------------------


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A header row and body rows as an aligned Markdown table."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def _ms(v: float) -> str:
    return f"{v:.2f} ms"


def accuracy_table(acc: Accuracy) -> str:
    psnr = f"{acc.psnr_db:.1f} dB" if math.isfinite(acc.psnr_db) else jsonable(acc.psnr_db)  # as the JSON says
    return markdown_table([
        ("parity (float)", "value", "threshold", "result"),
        ("MAE", f"{acc.mae:.3g}", f"< {acc.thresholds['mae']:g}", "PASS" if acc.passed else "FAIL"),
        ("max error", f"{acc.max_error:.3g}", f"< {acc.thresholds['max_error']:g}", ""),
        ("MSE", f"{acc.mse:.3g}", "", ""),
        ("PSNR", psnr, "", ""),
        ("pixels err < 1%", f"{acc.pct_pixels_err_lt_1pct:.2f}%", "", ""),
        ("pixels err < 0.5%", f"{acc.pct_pixels_err_lt_0_5pct:.2f}%", "", ""),
        ("8-bit PNG MAE / max", f"{acc.png.mae:.3g} / {acc.png.max_error:.3g}", "", ""),
    ])


def performance_table(perf: Performance, memory: Memory) -> str:
    ort, dev = perf.ort_cpu, perf.torch
    rows = [
        ("metric", "ONNX Runtime CPU", f"PyTorch {perf.device_type.upper()}", "ratio"),
        ("mean latency", _ms(ort.mean_ms), _ms(dev.mean_ms), f"x{perf.speedup_mean:.2f}"),
        ("median latency", _ms(ort.median_ms), _ms(dev.median_ms), f"x{perf.speedup_median:.2f}"),
        ("p90 latency", _ms(ort.p90_ms), _ms(dev.p90_ms), ""),
        ("throughput (batch 1)", f"{ort.fps:.2f} FPS", f"{dev.fps:.2f} FPS", ""),
    ]
    for t in perf.throughput:
        if t.batch_size != 1:
            rows.append((f"throughput (batch {t.batch_size})", f"{t.ort_images_per_s:.2f} img/s",
                         f"{t.torch_images_per_s:.2f} img/s", t.ort_mode))
    if memory.device_peak_mb is not None:
        rows.append(("device peak memory", "-", f"{memory.device_peak_mb:.2f} MB", ""))
    rows.append(("process peak RSS", f"{memory.process_peak_rss_mb:.2f} MB", "", ""))
    return markdown_table(rows) + noise_note(perf)


def noise_note(perf: Performance) -> str:
    """A line under the table when the machine was busy during the timed runs ("" when quiet or unmeasured)."""
    x = perf.extra
    if not x.get("noisy"):
        return ""
    others = x.get("other_cpu_load")
    detail = f"other processes used {others:.1f} CPUs, " if isinstance(others, (int, float)) else ""
    return (f"\nNOISY: machine busy ({detail}load {x.get('load_average', float('nan')):.1f}, "
            f"{perf.threads} thread(s)) - timings unreliable")


def summary_table(report: Report) -> str:
    text = accuracy_table(report.accuracy) + "\n\n" + performance_table(report.performance, report.memory)
    return text if report.routes is None else text + "\n\n" + report.routes.table()
