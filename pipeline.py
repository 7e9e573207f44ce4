"""The one-command pipeline, step by step: model, convert, analyse, device,
parity, benchmark, write. Each step is a small function returning a typed
result; :func:`run` calls them in order and builds the report once.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch

import devices
from convert_onnx_to_torch import Conversion, convert
from engines import OrtEngine, TorchEngine, default_threads
from fileio import write_image, write_json
from imaging import Size, input_size, load_image, normalize, parse_size_spec, resize_rgb, to_uint8
from model_source import DEFAULT_MODEL_ID, DEFAULT_MODELS_DIR, ModelSource, resolve_or_fallback
from modnet_arch import ArchReport, count_ops
from precision import MAE_THRESHOLDS, MAX_ERROR_THRESHOLD
from report import (
    Accuracy,
    ConversionInfo,
    InputInfo,
    Memory,
    ModelInfo,
    Performance,
    Report,
    Throughput,
    error_metrics,
    latency_stats,
)
from timing import interleaved
from weight_extractor import GraphFacts, OnnxWeights, read_weights

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IMAGE = os.path.join(HERE, "assets", "portrait_astronaut.jpg")
DEFAULT_OUTPUT = os.path.join(HERE, "output")
TOTAL_STEPS = 7


@dataclass(frozen=True)
class Options:
    """Everything a run can be told; the command line's defaults come from here."""

    model: str = DEFAULT_MODEL_ID
    sha256: str | None = None
    models_dir: str = DEFAULT_MODELS_DIR
    offline: bool = False
    synthetic_fallback: bool = True
    image: str = DEFAULT_IMAGE
    size: str | None = None  # auto, N (short side) or HxW; None: the file's own, else auto
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
    max_threshold: float = MAX_ERROR_THRESHOLD
    output_dir: str = DEFAULT_OUTPUT
    timeout: float = 30.0
    retries: int = 3
    log: Callable[[str], None] = field(default=print, compare=False)


def banner(text: str) -> str:
    line = "!" * 78
    return f"{line}\n!! WARNING: {text}\n{line}"


class _Steps:
    """Numbered step headings and indented detail lines."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log, self.n = log, 0

    def start(self, text: str) -> None:
        self.n += 1
        self.log(f"[{self.n}/{TOTAL_STEPS}] {text}")

    def detail(self, text: str) -> None:
        self.log("      " + text)


# --------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------


def step_model(opts: Options, say: _Steps) -> ModelSource:
    say.start(f"Model: {opts.model}")
    src = resolve_or_fallback(opts.model, opts.models_dir, allow_synthetic=opts.synthetic_fallback,
                              sha256=opts.sha256, offline=opts.offline, timeout=opts.timeout,
                              retries=opts.retries, log=say.detail)
    if src.warning:
        say.log(banner(src.warning))
    say.detail(f"{src.source}: {src.path} (sha256 {src.sha256[:16]}…)")
    return src


@dataclass(frozen=True)
class Converted:
    conversion: Conversion
    weights: OnnxWeights
    facts: GraphFacts


def step_convert(src: ModelSource, say: _Steps) -> Converted:
    say.start("Convert: place the ONNX weights in the PyTorch MODNet by graph structure")
    weights = read_weights(src.path)
    conversion = convert(weights)
    r = conversion.report
    say.detail(f"{r.num_units} layers placed, {r.num_folded_batchnorms} folded BatchNorms, strict load OK"
               + (f", {len(r.leftovers)} unused tensors" if r.leftovers else ""))
    return Converted(conversion, weights, weights.facts())


@dataclass(frozen=True)
class Analysis:
    arch: ArchReport
    image_rgb: np.ndarray
    size: Size  # the model input (height, width) of the parity run
    static: bool


def parity_size(facts: GraphFacts, spec: str | None, image_hw: tuple[int, int]) -> Size:
    """The file's fixed size for a static graph, else ``spec`` (auto, N or HxW) for this image."""
    inp = facts.inputs[0]
    if inp.is_static:
        return int(inp.shape[2]), int(inp.shape[3])
    return input_size(parse_size_spec(spec or "auto"), *image_hw)


def step_analyse(opts: Options, converted: Converted, say: _Steps) -> Analysis:
    import modnet_arch

    say.start("Analyse the graph and the input")
    facts = converted.facts
    image_rgb = load_image(opts.image)
    size = parity_size(facts, opts.size, image_rgb.shape[:2])
    static = facts.inputs[0].is_static
    if static and opts.size is not None:
        say.detail(f"note: the file's input is fixed at {size[0]}x{size[1]}; --size {opts.size} applies to "
                   "dynamic files only")
    arch = modnet_arch.analyse(converted.weights, *size, conversion=converted.conversion, facts=facts)
    say.detail(f"opset {arch.opset}, input {arch.input.name} {list(arch.input.shape)} "
               f"({'static' if static else 'dynamic'}), output {arch.output.name}")
    say.detail(f"{arch.num_weight_tensors} weight tensors, {arch.num_parameters:,} parameters, "
               f"{arch.num_convolutions} convolutions, {arch.macs / 1e9:.2f} GMAC at {size[0]}x{size[1]}")
    return Analysis(arch, image_rgb, size, static)


@dataclass(frozen=True)
class DeviceSetup:
    device: torch.device
    settings: dict[str, str]
    environment: devices.Environment
    engine: TorchEngine
    operators: dict[str, dict[str, int]]


def _operator_counts(conversion: Conversion, measured: torch.nn.Module, form: str, size: Size) -> dict:
    """Operators per forward of the measured form, and of the faithful one for comparison."""
    probe = torch.zeros(1, 3, *size)
    counts = {form: dict(zip(("total", "kernels"), count_ops(measured, probe)[:2]))}
    if form != "faithful":
        counts["faithful"] = dict(zip(("total", "kernels"), count_ops(conversion.model, probe)[:2]))
    return counts


def step_device(opts: Options, converted: Converted, size: Size, say: _Steps) -> DeviceSetup:
    from inference_form import optimize

    say.start(f"Device: {opts.device}")
    device = devices.select_device(opts.device)
    settings = devices.prepare(device, strict_fp32=True)
    env = devices.environment(device)
    say.detail(f"{device} ({env.device_name}), precision {opts.precision}"
               + (f", {', '.join(f'{k}={v}' for k, v in settings.items())}" if settings else ""))
    model = converted.conversion.model if opts.model_form == "faithful" else optimize(converted.conversion.model)
    operators = _operator_counts(converted.conversion, model, opts.model_form, size)
    engine = TorchEngine(model, device, precision=opts.precision, compile=opts.compile, graphs=opts.graphs,
                         threads=opts.threads, log=say.detail)
    say.detail(f"model form {opts.model_form} ({operators[opts.model_form]['kernels']} kernel launches per "
               f"forward); fast path: {engine.describe}")
    return DeviceSetup(device, settings, env, engine, operators)


@dataclass(frozen=True)
class Parity:
    x: np.ndarray  # the model input, batch 1
    model_rgb: np.ndarray
    ort_matte: np.ndarray
    torch_matte: np.ndarray
    accuracy: Accuracy


def step_parity(opts: Options, analysis: Analysis, dev: DeviceSetup, ort: OrtEngine, say: _Steps) -> Parity:
    say.start(f"Parity: ONNX Runtime CPU vs PyTorch {dev.device.type} on {os.path.basename(opts.image)}")
    model_rgb = resize_rgb(analysis.image_rgb, analysis.size)
    x = normalize(model_rgb)[None]
    ort_out = ort.infer(x)[0]
    dev_out = dev.engine.infer(x)[0]
    floats = error_metrics(ort_out, dev_out)
    png = error_metrics(to_uint8(ort_out) / 255.0, to_uint8(dev_out) / 255.0)
    mae_bound = opts.mae_threshold if opts.mae_threshold is not None else MAE_THRESHOLDS[opts.precision]
    passed = floats.mae < mae_bound and floats.max_error < opts.max_threshold
    accuracy = Accuracy(**asdict(floats), png=png, thresholds={"mae": mae_bound, "max_error": opts.max_threshold},
                        passed=passed, precision=opts.precision, device_settings=dev.settings)
    say.detail(f"MAE {floats.mae:.3g}, max error {floats.max_error:.3g}, PSNR {floats.psnr_db:.1f} dB -> "
               f"{'PASS' if passed else 'FAIL'}")
    return Parity(x, model_rgb, ort_out, dev_out, accuracy)


def _throughput(ort: OrtEngine, engine: TorchEngine, x: np.ndarray, batch: int, runs: int) -> Throughput:
    """Images per second at ``batch``; a static batch-1 ONNX graph takes the images one by one."""
    xb = np.repeat(x, batch, axis=0)
    xbt = engine.to_device(xb)
    engine.timed(xbt)  # a new shape may capture or compile: not timed
    times = interleaved({"torch": lambda: engine.timed(xbt), "ort": lambda: ort.run(xb)},
                        runs=max(3, runs // batch), sync=lambda: devices.synchronize(engine.device), rotate=False)
    sequential = ort.fixed_batch is not None and ort.fixed_batch != batch
    return Throughput(batch, batch * 1000.0 / float(np.median(times["torch"])),
                      batch * 1000.0 / float(np.median(times["ort"])), "sequential" if sequential else "batched")


def step_benchmark(opts: Options, dev: DeviceSetup, ort: OrtEngine, x: np.ndarray, say: _Steps
                   ) -> tuple[Performance, Memory]:
    threads = default_threads(opts.threads)
    say.start(f"Benchmark: {opts.warmup} warm-up + {opts.runs} timed runs each, interleaved, {threads} CPU thread(s)")
    engine = dev.engine
    xt = engine.to_device(x)
    sync = lambda: devices.synchronize(dev.device)  # noqa: E731
    times = interleaved({"ort": lambda: ort.run(x), "torch": lambda: engine.runner(xt)}, runs=opts.runs,
                        warmup=opts.warmup, sync=sync, rotate=False,
                        after_warmup=lambda: devices.reset_peak_memory(dev.device))
    performance = Performance(
        ort_cpu=latency_stats(times["ort"]), torch=latency_stats(times["torch"]), device_type=dev.device.type,
        throughput=[_throughput(ort, engine, x, b, opts.runs) for b in opts.batch_sizes],
        threads=threads, model_form=opts.model_form, fast_path=engine.describe, operators=dev.operators,
    )
    rss, peak_rss = devices.process_rss_mb()
    memory = Memory(devices.peak_memory_mb(dev.device), rss, peak_rss)
    say.detail(f"ORT CPU median {performance.ort_cpu.median_ms:.2f} ms, PyTorch {dev.device.type} median "
               f"{performance.torch.median_ms:.2f} ms, speed-up x{performance.speedup_median:.2f}")
    return performance, memory


def step_write(opts: Options, parity: Parity, performance: Performance, size: Size, say: _Steps) -> list[str]:
    from PIL import Image

    from figures import benchmark_figure, comparison_figure

    say.start(f"Write {opts.output_dir}")
    tag = performance.device_type
    ort_ms, dev_ms = performance.ort_cpu, performance.torch
    files = {
        "test_input.png": Image.fromarray(parity.model_rgb),
        "matte_ort_cpu.png": Image.fromarray(to_uint8(parity.ort_matte)),
        f"matte_{tag}.png": Image.fromarray(to_uint8(parity.torch_matte)),
        "comparison.png": comparison_figure(parity.model_rgb, parity.ort_matte, parity.torch_matte, tag),
        "benchmark.png": benchmark_figure(
            [("ORT CPU median", ort_ms.median_ms), (f"PyTorch {tag} median", dev_ms.median_ms),
             ("ORT CPU mean", ort_ms.mean_ms), (f"PyTorch {tag} mean", dev_ms.mean_ms)],
            f"MODNet {size[0]}x{size[1]}, batch 1, {opts.runs} interleaved runs",
        ),
    }
    for name, img in files.items():
        write_image(os.path.join(opts.output_dir, name), img)
    return sorted(list(files) + ["evaluation_report.json"])


# --------------------------------------------------------------------------
# all of it
# --------------------------------------------------------------------------


def _model_info(src: ModelSource, arch: ArchReport, conversion: Conversion) -> ModelInfo:
    r = conversion.report
    return ModelInfo(
        source=src.source, path=src.path, sha256=src.sha256, opset=arch.opset,
        num_weight_tensors=arch.num_weight_tensors, num_parameters=arch.num_parameters,
        input_shape=list(arch.input.shape), input_name=r.input_name, output_name=r.output_name,
        static_input=arch.static_input, gmacs=round(arch.macs / 1e9, 3), method=src.method,
        warning=src.warning, download_attempts=list(src.attempts),
    )


def run(opts: Options) -> Report:
    """Run the whole pipeline; returns the report (also written to disk)."""
    started = time.perf_counter()
    say = _Steps(opts.log)
    devices.select_device(opts.device)  # a missing device fails now, not after the slow steps
    src = step_model(opts, say)
    converted = step_convert(src, say)
    analysis = step_analyse(opts, converted, say)
    dev = step_device(opts, converted, analysis.size, say)
    try:
        ort = OrtEngine(src.path, threads=opts.threads, validate=False)  # converted in step 2
        parity = step_parity(opts, analysis, dev, ort, say)
        performance, memory = step_benchmark(opts, dev, ort, parity.x, say)
        outputs = step_write(opts, parity, performance, analysis.size, say)
    finally:
        dev.engine.close()
    r = converted.conversion.report
    report = Report(
        model=_model_info(src, analysis.arch, converted.conversion),
        environment=dev.environment,
        input=InputInfo(os.path.abspath(opts.image), list(analysis.image_rgb.shape[:2]), list(analysis.size)),
        conversion=ConversionInfo(r.num_units, r.num_folded_batchnorms, r.num_source_tensors_used,
                                  [n for n, _ in r.leftovers]),
        accuracy=parity.accuracy, performance=performance, memory=memory, outputs=outputs,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        duration_s=round(time.perf_counter() - started, 2),
    )
    write_json(os.path.join(opts.output_dir, "evaluation_report.json"), report.to_dict())
    return report
