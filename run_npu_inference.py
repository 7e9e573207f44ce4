"""One command: adapt MODNet to the accelerator, prove it faithful, measure it.

``python3 run_npu_inference.py`` gets the ONNX model, analyses its graph,
converts it to the hand-written PyTorch MODNet, runs ONNX Runtime on the CPU
and PyTorch on the device side by side on a real portrait, benchmarks both, and
writes ``output/``: the input, both mattes, a comparison figure, a latency
chart and ``evaluation_report.json``.

Importable for notebooks, as the seed shows::

    from run_npu_inference import build_torch_model_from_onnx, preprocess, postprocess
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np
import torch

import devices
from convert_onnx_to_torch import ConversionError, build_torch_model_from_onnx, convert
from fast_path import FastPathError, TorchEngine
from fileio import write_image, write_json
from imaging import ImageReadError, load_image, normalize, postprocess, preprocess, resize_rgb, resolve_size, to_uint8
from modnet_fast import PRECISIONS, count_ops, optimize
from model_source import DEFAULT_MODEL_ID, ModelSource, ModelSourceError, resolve_model, synthetic_fallback
from weight_extractor import OnnxReadError, read_weights

__all__ = ["build_torch_model_from_onnx", "preprocess", "postprocess", "main"]

DEFAULT_IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "portrait_astronaut.jpg")
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
# default parity MAE bound per PyTorch-side precision (the fast-path targets for half precision)
MAE_THRESHOLDS = {"fp32": 1e-3, "fp16": 2e-3, "bf16": 1e-2}


# --------------------------------------------------------------------------
# report schema (documented in README.md)
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


@dataclass(frozen=True)
class ErrorMetrics:
    mae: float
    mse: float
    psnr_db: float
    max_error: float
    pct_pixels_err_lt_1pct: float
    pct_pixels_err_lt_0_5pct: float


@dataclass(frozen=True)
class Accuracy(ErrorMetrics):
    """The float mattes' errors, flat, plus the 8-bit ones and the verdict."""

    png: ErrorMetrics
    thresholds: dict[str, float]
    passed: bool
    precision: str
    device_settings: dict[str, str]


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


@dataclass(frozen=True)
class Throughput:
    batch_size: int
    torch_images_per_s: float
    ort_images_per_s: float
    ort_mode: str  # "batched" or "sequential" (a static batch-1 graph)


@dataclass(frozen=True)
class Performance:
    ort_cpu: LatencyStats
    torch: LatencyStats
    torch_key: str
    throughput: list[Throughput]
    speedup_mean: float
    speedup_median: float
    threads: int
    model_form: str
    fast_path: str
    operators: dict[str, dict[str, int]]
    interleaved: bool = True


@dataclass(frozen=True)
class Memory:
    device_peak_mb: float | None
    process_rss_mb: float
    process_peak_rss_mb: float


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
# engines
# --------------------------------------------------------------------------


def ort_session(path: str, threads: int):
    """ONNX Runtime on the CPU with ``threads`` intra-op threads and spinning off.

    Spinning threads keep the cores busy after each run and would slow whatever
    runs next in this process (the PyTorch side), skewing the comparison.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _timed_ort(session, name: str, x: np.ndarray) -> float:
    start = time.perf_counter()
    session.run(None, {name: x})
    return (time.perf_counter() - start) * 1000.0


def time_batch_one(session, in_name: str, x: np.ndarray, runner: TorchEngine, warmup: int,
                   runs: int) -> tuple[LatencyStats, LatencyStats]:
    """Latency of ONNX Runtime and PyTorch at batch 1, run for run (interleaved).

    Interleaving makes the drift of a noisy machine hit both sides alike. The
    device's peak-memory counter is reset after the warm-up.
    """
    xt = torch.from_numpy(x).to(runner.device, runner.dtype)
    for _ in range(warmup):
        session.run(None, {in_name: x})
        runner.timed(xt)
    devices.reset_peak_memory(runner.device)
    ort_times, dev_times = [], []
    for _ in range(runs):
        ort_times.append(_timed_ort(session, in_name, x))
        dev_times.append(runner.timed(xt))
    return latency_stats(ort_times), latency_stats(dev_times)


def time_throughput(session, in_name: str, x: np.ndarray, runner: TorchEngine, batch: int, runs: int,
                    batch_dynamic: bool) -> Throughput:
    """Images per second at ``batch``; a static batch-1 ONNX graph takes the images one by one."""
    xb = np.repeat(x, batch, axis=0)
    xbt = torch.from_numpy(xb).to(runner.device, runner.dtype)
    runner.timed(xbt)  # a new shape may capture or compile: not timed
    batched = batch_dynamic or batch == 1
    t_dev, t_ort = [], []
    for _ in range(max(3, runs // batch)):
        t_dev.append(runner.timed(xbt))
        if batched:
            t_ort.append(_timed_ort(session, in_name, xb))
        else:
            t_ort.append(sum(_timed_ort(session, in_name, x) for _ in range(batch)))
    return Throughput(batch, batch * 1000.0 / float(np.median(t_dev)), batch * 1000.0 / float(np.median(t_ort)),
                      "batched" if batched else "sequential")


# --------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------


def _heat(err: np.ndarray, scale: float) -> np.ndarray:
    """Black -> red -> yellow -> white as the error goes 0 -> ``scale``."""
    v = np.clip(err / scale, 0, 1)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def comparison_figure(image: np.ndarray, ort_matte: np.ndarray, dev_matte: np.ndarray, dev_label: str):
    from PIL import Image, ImageDraw

    err = np.abs(ort_matte.astype(np.float64) - dev_matte.astype(np.float64))
    scale = max(1e-6, 10 ** math.ceil(math.log10(max(err.max(), 1e-6))))
    h, w = image.shape[:2]
    panels = [
        ("input", image),
        ("ONNX Runtime CPU", np.repeat(to_uint8(ort_matte)[..., None], 3, 2)),
        (f"PyTorch {dev_label}", np.repeat(to_uint8(dev_matte)[..., None], 3, 2)),
        (f"|error|, white = {scale:g}", _heat(err, scale)),
    ]
    pad, top = 8, 22
    canvas = Image.new("RGB", (len(panels) * (w + pad) + pad, h + top + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, arr) in enumerate(panels):
        x = pad + i * (w + pad)
        canvas.paste(Image.fromarray(arr), (x, top))
        draw.text((x, 5), title, fill="black")
    return canvas


def benchmark_figure(bars: Sequence[tuple[str, float]], title: str):
    from PIL import Image, ImageDraw

    width, row, left = 640, 34, 170
    canvas = Image.new("RGB", (width, 40 + row * len(bars) + 10), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 10), title, fill="black")
    top = max(v for _, v in bars) or 1.0
    colours = ["#888888", "#d9480f", "#1c7ed6", "#2b8a3e"]
    for i, (label, value) in enumerate(bars):
        y = 40 + i * row
        length = int((width - left - 90) * value / top)
        draw.text((10, y + 8), label, fill="black")
        draw.rectangle([left, y + 4, left + max(length, 1), y + row - 8], fill=colours[i % len(colours)])
        draw.text((left + length + 6, y + 8), f"{value:.2f} ms", fill="black")
    return canvas


# --------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------


@dataclass
class Options:
    model: str = DEFAULT_MODEL_ID
    sha256: str | None = None
    models_dir: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
    offline: bool = False
    synthetic_fallback: bool = True
    image: str = DEFAULT_IMAGE
    size: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    runs: int = 20
    warmup: int = 3
    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int = 0
    model_form: str = "optimized"
    compile: bool = False
    graphs: str = "auto"
    mae_threshold: float | None = None  # None: MAE_THRESHOLDS[precision]
    max_threshold: float = 5e-2
    output_dir: str = DEFAULT_OUTPUT
    timeout: float = 30.0
    retries: int = 3
    log: Callable[[str], None] = field(default=print)


class PipelineError(RuntimeError):
    pass


def _step(log: Callable[[str], None], n: int, total: int, text: str) -> None:
    log(f"[{n}/{total}] {text}")


def banner(text: str) -> str:
    line = "!" * 78
    return f"{line}\n!! WARNING: {text}\n{line}"


def run(opts: Options) -> dict:
    """Run the whole pipeline; returns the report dict (also written to disk)."""
    log = opts.log
    started = time.perf_counter()
    total = 7
    threads = opts.threads or (os.cpu_count() or 1)
    device = devices.select_device(opts.device)  # a missing device fails now, not after the slow steps

    # 1. model --------------------------------------------------------------
    _step(log, 1, total, f"Model: {opts.model}")
    try:
        src = resolve_model(opts.model, opts.models_dir, opts.sha256, opts.offline, opts.timeout,
                            opts.retries, log=lambda m: log("      " + m))
    except ModelSourceError as exc:
        is_id = not opts.model.startswith(("http://", "https://")) and not opts.model.endswith(".onnx") \
            and not os.path.exists(opts.model)
        if not (opts.synthetic_fallback and is_id and "checksum" not in str(exc)):
            raise
        log("      no download possible; falling back to a generated model")
        src = synthetic_fallback(opts.models_dir, attempts=exc.attempts or (str(exc),))
    if src.warning:
        log(banner(src.warning))
    log(f"      {src.source}: {src.path} (sha256 {src.sha256[:16]}…)")

    # 2. analyse ------------------------------------------------------------
    _step(log, 2, total, "Analyse the ONNX graph")
    import modnet_arch

    weights = read_weights(src.path)
    conversion = convert(weights)
    facts = weights.facts()
    image_rgb = load_image(opts.image)
    static = facts.inputs[0].is_static
    if static:
        size = (int(facts.inputs[0].shape[2]), int(facts.inputs[0].shape[3]))
        if opts.size not in (None, f"{size[0]}x{size[1]}", str(size[0]) if size[0] == size[1] else None):
            log(f"      note: the file's input is fixed at {size[0]}x{size[1]}; --size {opts.size} ignored for parity")
    else:
        spec = opts.size or "auto"
        size = resolve_size(spec if spec == "auto" else _parse_hw(spec), *image_rgb.shape[:2])
    arch = modnet_arch.analyse(weights, *size, conversion=conversion)
    log(f"      opset {arch.opset}, input {arch.input.name} {list(arch.input.shape)} "
        f"({'static' if static else 'dynamic'}), output {arch.output.name}")
    log(f"      {arch.num_weight_tensors} weight tensors, {arch.num_parameters:,} parameters, "
        f"{arch.num_convolutions} convolutions, {arch.macs / 1e9:.2f} GMAC at {size[0]}x{size[1]}")

    # 3. build --------------------------------------------------------------
    _step(log, 3, total, "Build the PyTorch MODNet from the ONNX weights")
    r = conversion.report
    log(f"      {r.num_units} layers placed by graph structure, {r.num_folded_batchnorms} folded BatchNorms, "
        f"strict load OK" + (f", {len(r.leftovers)} unused tensors" if r.leftovers else ""))

    # 4. device -------------------------------------------------------------
    _step(log, 4, total, f"Device: {opts.device}")
    settings = devices.prepare(device, strict_fp32=True)
    tag = device.type  # names the files and report keys: matte_npu.png, torch_npu
    env = devices.environment(device)
    log(f"      {device} ({env.device_name}), precision {opts.precision}"
        + (f", {', '.join(f'{k}={v}' for k, v in settings.items())}" if settings else ""))
    forms = {"faithful": conversion.model, "optimized": optimize(conversion.model)}
    probe = torch.zeros(1, 3, *size)
    operators = {form: dict(zip(("total", "kernels"), count_ops(m, probe)[:2])) for form, m in forms.items()}
    model = forms[opts.model_form]
    runner = TorchEngine(model, device, opts.precision, opts.compile, opts.graphs, threads,
                         log=lambda m: log("      " + m))
    log(f"      model form {opts.model_form} ({operators[opts.model_form]['kernels']} kernel launches per "
        f"forward, faithful {operators['faithful']['kernels']}); fast path: {runner.describe}")

    # 5. parity -------------------------------------------------------------
    _step(log, 5, total, f"Parity: ONNX Runtime CPU vs PyTorch {tag} on {os.path.basename(opts.image)}")
    model_rgb = resize_rgb(image_rgb, size)
    x = normalize(model_rgb)[None]
    session = ort_session(src.path, threads)
    in_name = session.get_inputs()[0].name
    ort_out = session.run(None, {in_name: x})[0][0, 0]
    dev_out = runner(x)[0, 0]
    floats = error_metrics(ort_out, dev_out)
    png = error_metrics(to_uint8(ort_out) / 255.0, to_uint8(dev_out) / 255.0)
    mae_bound = opts.mae_threshold if opts.mae_threshold is not None else MAE_THRESHOLDS[opts.precision]
    passed = floats.mae < mae_bound and floats.max_error < opts.max_threshold
    accuracy = Accuracy(**asdict(floats), png=png,
                        thresholds={"mae": mae_bound, "max_error": opts.max_threshold},
                        passed=passed, precision=opts.precision, device_settings=settings)
    log(f"      MAE {floats.mae:.3g}, max error {floats.max_error:.3g}, PSNR {floats.psnr_db:.1f} dB -> "
        f"{'PASS' if passed else 'FAIL'}")

    # 6. benchmark ----------------------------------------------------------
    _step(log, 6, total, f"Benchmark: {opts.warmup} warm-up + {opts.runs} timed runs each, interleaved, "
                         f"{threads} CPU thread(s)")
    ort_stats, dev_stats = time_batch_one(session, in_name, x, runner, opts.warmup, opts.runs)
    batch_dynamic = not isinstance(facts.inputs[0].shape[0], int)
    throughput = [time_throughput(session, in_name, x, runner, b, opts.runs, batch_dynamic) for b in opts.batch_sizes]
    performance = Performance(
        ort_cpu=ort_stats, torch=dev_stats, torch_key=f"torch_{tag}", throughput=throughput,
        speedup_mean=ort_stats.mean_ms / dev_stats.mean_ms, speedup_median=ort_stats.median_ms / dev_stats.median_ms,
        threads=threads, model_form=opts.model_form, fast_path=runner.describe, operators=operators,
    )
    rss, peak_rss = devices.process_rss_mb()
    memory = Memory(devices.peak_memory_mb(device), rss, peak_rss)
    log(f"      ORT CPU median {ort_stats.median_ms:.2f} ms, PyTorch {tag} median {dev_stats.median_ms:.2f} ms, "
        f"speed-up x{performance.speedup_median:.2f}")

    # 7. outputs ------------------------------------------------------------
    _step(log, 7, total, f"Write {opts.output_dir}")
    from PIL import Image

    out = opts.output_dir
    files = {
        "test_input.png": Image.fromarray(model_rgb),
        "matte_ort_cpu.png": Image.fromarray(to_uint8(ort_out)),
        f"matte_{tag}.png": Image.fromarray(to_uint8(dev_out)),
        "comparison.png": comparison_figure(model_rgb, ort_out, dev_out, tag),
        "benchmark.png": benchmark_figure(
            [("ORT CPU median", ort_stats.median_ms), (f"PyTorch {tag} median", dev_stats.median_ms),
             ("ORT CPU mean", ort_stats.mean_ms), (f"PyTorch {tag} mean", dev_stats.mean_ms)],
            f"MODNet {size[0]}x{size[1]}, batch 1, {opts.runs} interleaved runs",
        ),
    }
    for name, img in files.items():
        write_image(os.path.join(out, name), img)
    report = {
        "model": asdict(_model_info(src, arch, r)),
        "environment": asdict(env),
        "input": {"path": os.path.abspath(opts.image), "original_size": list(image_rgb.shape[:2]),
                  "model_size": list(size)},
        "conversion": {"layers_placed": r.num_units, "folded_batchnorms": r.num_folded_batchnorms,
                       "source_tensors_used": r.num_source_tensors_used,
                       "leftover_tensors": [n for n, _ in r.leftovers]},
        "accuracy": asdict(accuracy),
        "performance": _performance_dict(performance),
        "memory": asdict(memory),
        "outputs": sorted(list(files) + ["evaluation_report.json"]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 2),
    }
    write_json(os.path.join(out, "evaluation_report.json"), _jsonable(report))
    return report


def _parse_hw(text: str) -> int | tuple[int, int]:
    parts = text.lower().split("x")
    try:
        return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise ValueError(f"--size must be auto, N or HxW, got {text!r}") from None


def _model_info(src: ModelSource, arch, r) -> ModelInfo:
    return ModelInfo(
        source=src.source, path=src.path, sha256=src.sha256, opset=arch.opset,
        num_weight_tensors=arch.num_weight_tensors, num_parameters=arch.num_parameters,
        input_shape=list(arch.input.shape), input_name=r.input_name, output_name=r.output_name,
        static_input=arch.static_input, gmacs=round(arch.macs / 1e9, 3), method=src.method,
        warning=src.warning, download_attempts=list(src.attempts),
    )


def _performance_dict(p: Performance) -> dict:
    return {
        "ort_cpu": asdict(p.ort_cpu),
        p.torch_key: asdict(p.torch),
        "throughput": [asdict(t) for t in p.throughput],
        "speedup_mean": p.speedup_mean,
        "speedup_median": p.speedup_median,
        "threads": p.threads,
        "model_form": p.model_form,
        "fast_path": p.fast_path,
        "operators": p.operators,
        "interleaved": p.interleaved,
    }


def _jsonable(obj):
    """JSON has no inf/nan: write them as strings a reader can still parse."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    return obj


def summary_table(report: dict) -> str:
    acc, perf, mem = report["accuracy"], report["performance"], report["memory"]
    key = next(k for k in perf if k.startswith("torch_"))
    ort, dev = perf["ort_cpu"], perf[key]
    dev_name = key.removeprefix("torch_").upper()
    fmt = lambda v, u="": f"{v:.2f}{u}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    rows = [
        ("metric", "ONNX Runtime CPU", f"PyTorch {dev_name}", "ratio"),
        ("mean latency", fmt(ort["mean_ms"], " ms"), fmt(dev["mean_ms"], " ms"), f"x{perf['speedup_mean']:.2f}"),
        ("median latency", fmt(ort["median_ms"], " ms"), fmt(dev["median_ms"], " ms"), f"x{perf['speedup_median']:.2f}"),
        ("p90 latency", fmt(ort["p90_ms"], " ms"), fmt(dev["p90_ms"], " ms"), ""),
        ("throughput (batch 1)", fmt(ort["fps"], " FPS"), fmt(dev["fps"], " FPS"), ""),
    ]
    for t in perf["throughput"]:
        if t["batch_size"] != 1:
            rows.append((f"throughput (batch {t['batch_size']})", fmt(t["ort_images_per_s"], " img/s"),
                         fmt(t["torch_images_per_s"], " img/s"), t["ort_mode"]))
    if mem["device_peak_mb"] is not None:
        rows.append(("device peak memory", "-", fmt(mem["device_peak_mb"], " MB"), ""))
    rows.append(("process peak RSS", fmt(mem["process_peak_rss_mb"], " MB"), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    perf_table = "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])
    acc_rows = [
        ("parity (float)", "value", "threshold", "result"),
        ("MAE", f"{acc['mae']:.3g}", f"< {acc['thresholds']['mae']:g}", "PASS" if acc["passed"] else "FAIL"),
        ("max error", f"{acc['max_error']:.3g}", f"< {acc['thresholds']['max_error']:g}", ""),
        ("MSE", f"{acc['mse']:.3g}", "", ""),
        ("PSNR", f"{acc['psnr_db']:.1f} dB" if isinstance(acc["psnr_db"], float) else acc["psnr_db"], "", ""),
        ("pixels err < 1%", f"{acc['pct_pixels_err_lt_1pct']:.2f}%", "", ""),
        ("pixels err < 0.5%", f"{acc['pct_pixels_err_lt_0_5pct']:.2f}%", "", ""),
        ("8-bit PNG MAE / max", f"{acc['png']['mae']:.3g} / {acc['png']['max_error']:.3g}", "", ""),
    ]
    widths = [max(len(r[i]) for r in acc_rows) for i in range(4)]
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    acc_table = "\n".join([line(acc_rows[0]), sep] + [line(r) for r in acc_rows[1:]])
    return acc_table + "\n\n" + perf_table


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert MODNet ONNX to PyTorch, verify it against ONNX Runtime, benchmark, and report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=Options.model, help="local .onnx path, http(s) URL, or model id")
    p.add_argument("--sha256", default=None, help="expected sha256 of the model file (known for the default id)")
    p.add_argument("--models-dir", default=Options.models_dir, help="download cache")
    p.add_argument("--offline", action="store_true", help="never download; use the cache or the generated model")
    p.add_argument("--no-synthetic-fallback", action="store_true",
                   help="fail instead of using a generated model when the model id cannot be downloaded")
    p.add_argument("--image", default=Options.image, help="input image for the parity run")
    p.add_argument("--size", default=None,
                   help="model input size for dynamic graphs: auto, N or HxW (static graphs use their own)")
    p.add_argument("--device", default=Options.device, help=devices.DEVICE_CHOICES)
    p.add_argument("--precision", choices=list(PRECISIONS), default=Options.precision, help="PyTorch-side precision")
    p.add_argument("--runs", type=_positive_int, default=Options.runs, help="timed runs per engine")
    p.add_argument("--warmup", type=int, default=Options.warmup, help="untimed warm-up runs per engine")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=Options.batch_sizes, help="throughput batch sizes, e.g. 1,8")
    p.add_argument("--threads", type=int, default=Options.threads, help="CPU threads for both engines (0 = all cores)")
    p.add_argument("--model-form", choices=("optimized", "faithful"), default=Options.model_form,
                   help="PyTorch model measured: the inference form (BatchNorms folded, fewer launches) or the "
                        "module-for-module port")
    p.add_argument("--compile", action="store_true",
                   help="compile the PyTorch side: AOTInductor on CPU/CUDA (packages cached in models/.compile-cache, "
                        "so only the first run per input shape pays), torchair on NPU")
    p.add_argument("--graphs", choices=("auto", "on", "off"), default=Options.graphs,
                   help="graph capture of fixed shapes on CUDA/NPU (auto: where available)")
    p.add_argument("--mae-threshold", type=float, default=None,
                   help="parity passes below this MAE (default 1e-3 for fp32, 2e-3 for fp16, 1e-2 for bf16)")
    p.add_argument("--max-threshold", type=float, default=Options.max_threshold, help="parity passes below this max error")
    p.add_argument("--output-dir", default=Options.output_dir, help="where the outputs go")
    p.add_argument("--timeout", type=float, default=Options.timeout, help="download time-out per attempt, seconds")
    p.add_argument("--retries", type=_positive_int, default=Options.retries, help="download attempts")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)}
    opts = Options(**given, synthetic_fallback=not args.no_synthetic_fallback)
    try:
        report = run(opts)
    except (ModelSourceError, OnnxReadError, ConversionError, devices.DeviceError, ImageReadError,
            FastPathError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no partial outputs were left", file=sys.stderr)
        return 130
    print()
    print(summary_table(report))
    print(f"\nwrote {', '.join(report['outputs'])} to {opts.output_dir}")
    if report["model"]["warning"]:
        print(banner(report["model"]["warning"] + " (recorded in evaluation_report.json)"))
    if not report["accuracy"]["passed"]:
        print("error: parity FAILED: PyTorch output differs from ONNX Runtime beyond the thresholds", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
