"""The one-command pipeline, step by step: model, convert, analyse, device,
parity, benchmark, write. Each step is a small function returning a typed
result; :func:`run` calls them in order and builds the report once.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from modnet_npu import routes
from modnet_npu.runtime import devices
from modnet_npu.conversion.convert import Conversion, convert
from modnet_npu.runtime.engines import OrtEngine
from modnet_npu.runtime.torch_engine import TorchEngine
from modnet_npu.fileio import STALE_AFTER_S, clean_stale_parts, write_bytes, write_image, write_json
from modnet_npu.matting.imaging import Size, parse_size_spec, to_uint8
from modnet_npu.source.resolve import ModelSource, resolve_or_fallback
from modnet_npu.graph.analysis import ArchReport, count_ops
from modnet_npu.proof.parity import Case, CaseResult, ParitySummary, Thresholds, list_images, plan_cases, run_case, summarize
from modnet_npu.proof.parity import ground_truths, with_ground_truth
from modnet_npu.model.precision import MAE_THRESHOLDS
from modnet_npu.runtime.process_setup import effective_threads
from modnet_npu.runtime.options import compile_cache_dir
# the run's options live torch-free so a command line answers --help before torch loads
from modnet_npu.proof.options import DEFAULT_OUTPUT, ENGINE_DEFAULTS, Options  # noqa: F401  (re-exported)
from modnet_npu.proof.report import (
    Accuracy,
    ConversionInfo,
    InputInfo,
    Memory,
    ModelInfo,
    Performance,
    Report,
    Throughput,
    latency_stats,
    memory,
    ort_batch_mode,
)
from modnet_npu.proof.timing import NoiseProbe, interleaved
from modnet_npu.graph.weights import GraphFacts, OnnxWeights, read_weights

if TYPE_CHECKING:
    from modnet_npu.proof.layerwise import LayerwiseReport

TOTAL_STEPS = 7
# parity sizes of a dynamic file when none are given: the seed's run (256x256, so the
# benchmark, which runs at the first, compares with the seed's table), then MODNet's own rule
DEFAULT_SIZES = ("256x256", "auto")


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
    e = opts.engine
    say.start(f"Model: {e.model}")
    src = resolve_or_fallback(e.model, e.models_dir, allow_synthetic=e.allow_synthetic,
                              sha256=e.sha256, offline=e.offline, timeout=opts.timeout,
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
    cases: tuple[Case, ...]  # every image at every size the parity run covers
    size: Size  # the first case's size: the benchmark's input
    static: bool
    ground_truth: dict[str, str]  # photo path -> its alpha file, checked; empty without --alphas


def _cases(opts: Options, facts: GraphFacts, say: _Steps) -> list[Case]:
    inp = facts.inputs[0]
    fixed = (int(inp.shape[2]), int(inp.shape[3])) if inp.is_static else None
    given = opts.sizes or ([opts.size] if opts.size else [])
    specs = [parse_size_spec(s) for s in (given or (DEFAULT_SIZES if fixed is None else []))]
    if fixed is not None and given:
        say.detail(f"note: the file's input is fixed at {fixed[0]}x{fixed[1]}; --size/--sizes apply to dynamic "
                   "files only")
    paths = list_images(opts.images or ([] if opts.image_dirs else [opts.image]), opts.image_dirs)
    return plan_cases(paths, fixed=fixed, specs=specs)


def step_analyse(opts: Options, converted: Converted, say: _Steps) -> Analysis:
    from modnet_npu.graph import analysis as modnet_arch

    say.start("Analyse the graph and the inputs")
    facts = converted.facts
    cases = _cases(opts, facts, say)
    truths = ground_truths(cases, opts.alphas)  # a bad ground truth stops the run here, before any inference
    size = cases[0].size
    static = facts.inputs[0].is_static
    arch = modnet_arch.analyse(converted.weights, *size, conversion=converted.conversion, facts=facts)
    say.detail(f"opset {arch.opset}, input {arch.input.name} {list(arch.input.shape)} "
               f"({'static' if static else 'dynamic'}), output {arch.output.name}")
    say.detail(f"{arch.num_weight_tensors} weight tensors, {arch.num_parameters:,} parameters, "
               f"{arch.num_convolutions} convolutions, {arch.macs / 1e9:.2f} GMAC at {size[0]}x{size[1]}")
    if len(cases) > 1:
        say.detail(f"parity on {len({c.path for c in cases})} image(s), {len(cases)} image-size case(s)")
    return Analysis(arch, tuple(cases), size, static, truths)


@dataclass(frozen=True)
class DeviceSetup:
    device: torch.device
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
    from modnet_npu.model.optimized import optimize

    e = opts.engine
    say.start(f"Device: {e.device}")
    device = devices.select_device(e.device)
    # strict fp32 for parity, set before anything touches the device (the engine activates it again, harmlessly)
    activation = devices.activate(device, strict_fp32=True)
    env = devices.environment(device)
    say.detail(f"{device} ({env.device_name}), precision {e.precision}"
               + "".join(f", {k}={v}" for k, v in activation.requested.items()))
    model = converted.conversion.model if e.model_form == "faithful" else optimize(converted.conversion.model)
    operators = _operator_counts(converted.conversion, model, e.model_form, size)
    engine = TorchEngine(model, device, precision=e.precision, strict_fp32=True, compile=e.compile,
                         graphs=e.graphs, threads=e.threads, log=say.detail,
                         cache_dir=compile_cache_dir(e.models_dir))
    say.detail(f"model form {e.model_form} ({operators[e.model_form]['kernels']} kernel launches per "
               f"forward); fast path: {engine.fast_path}")
    return DeviceSetup(device, env, engine, operators)


@dataclass(frozen=True)
class Parity:
    summary: ParitySummary
    accuracy: Accuracy
    layerwise: LayerwiseReport | None

    @property
    def x(self) -> np.ndarray:
        """The benchmark's input: the first case's."""
        return self.summary.results[0].x


def _ground_truth(results: list[CaseResult], truths: dict[str, str]) -> list[CaseResult]:
    return [with_ground_truth(r, truths[r.case.path]) if truths else r for r in results]


def _layerwise(opts: Options, src: ModelSource, conversion: Conversion, dev: DeviceSetup, worst: CaseResult,
               say: _Steps) -> LayerwiseReport:
    from modnet_npu.proof.layerwise import compare_layers

    why = "asked for" if opts.layerwise else "parity failed"
    say.detail(f"layer-by-layer comparison ({why}) on {os.path.basename(worst.case.path)} "
               f"at {worst.case.size[0]}x{worst.case.size[1]}")
    # step 2's conversion: the file is not read, analysed and matched a second time
    rep = compare_layers(src.path, dev.engine.model, worst.x, threshold=opts.layer_threshold,
                         precision=opts.engine.precision, conversion=conversion)
    say.detail(f"{rep.layers_compared} layers compared; first divergence: {rep.first_divergence or 'none'}; "
               f"worst local error: {rep.worst_local}")
    return rep


def _accuracy(opts: Options, summary: ParitySummary, dev: DeviceSetup, bounds: Thresholds,
              rep: LayerwiseReport | None) -> Accuracy:
    worst = summary.worst
    extra: dict = {}
    if len(summary.results) > 1 or opts.alphas:
        extra["per_image"] = [r.to_dict() for r in summary.results]
        extra["aggregate"] = summary.aggregate()
    if rep is not None:
        extra["layerwise"] = {"layers_compared": rep.layers_compared, "first_divergence": rep.first_divergence,
                              "worst_local": rep.worst_local, "skipped": [name for name, _ in rep.skipped],
                              "threshold": rep.threshold}
    return Accuracy(**asdict(worst.floats), png=worst.png, thresholds={"mae": bounds.mae, "max_error": bounds.max_error},
                    passed=summary.passed, precision=opts.engine.precision,
                    # read back after the device ran: CANN applies some options only at device start
                    device_settings=dev.engine.device_settings().to_dict(), extra=extra)


def _bounds(opts: Options) -> Thresholds:
    """The parity bounds of the PyTorch side: the options', else its precision's defaults."""
    return Thresholds(opts.mae_threshold if opts.mae_threshold is not None else MAE_THRESHOLDS[opts.engine.precision],
                      opts.max_threshold)


def step_parity(opts: Options, src: ModelSource, conversion: Conversion, analysis: Analysis, dev: DeviceSetup,
                ort: OrtEngine, say: _Steps) -> Parity:
    first = analysis.cases[0]
    subject = os.path.basename(first.path) if len(analysis.cases) == 1 else f"{len(analysis.cases)} cases"
    say.start(f"Parity: ONNX Runtime CPU vs PyTorch {dev.device.type} on {subject}")
    bounds = _bounds(opts)
    results = _ground_truth([run_case(c, ort, dev.engine, bounds) for c in analysis.cases], analysis.ground_truth)
    summary = summarize(results)
    for r in results if len(results) > 1 else []:
        say.detail(f"{os.path.basename(r.case.path)} @ {r.case.size[0]}x{r.case.size[1]}: MAE {r.floats.mae:.3g}, "
                   f"max {r.floats.max_error:.3g} -> {'PASS' if r.passed else 'FAIL'}")
    w = summary.worst.floats
    say.detail(f"{'worst: ' if len(results) > 1 else ''}MAE {w.mae:.3g}, max error {w.max_error:.3g}, "
               f"PSNR {w.psnr_db:.1f} dB -> {'PASS' if summary.passed else 'FAIL'}")
    rep = _layerwise(opts, src, conversion, dev, summary.worst, say) if opts.layerwise or not summary.passed else None
    return Parity(summary, _accuracy(opts, summary, dev, bounds, rep), rep)


def _throughput(ort: OrtEngine, engine: TorchEngine, x: np.ndarray, batch: int, runs: int) -> Throughput:
    """Images per second at ``batch``; a static batch-1 ONNX graph takes the images one by one."""
    xb = np.repeat(x, batch, axis=0)
    xbt = engine.to_device(xb)
    engine.prepare(xbt)  # a new shape is captured or compiled now, not inside the timing
    times = interleaved({"torch": lambda: engine.timed(xbt), "ort": lambda: ort.run(xb)},
                        runs=max(3, runs // batch), sync=lambda: devices.synchronize(engine.device), rotate=False)
    return Throughput(batch, batch * 1000.0 / float(np.median(times["torch"])),
                      batch * 1000.0 / float(np.median(times["ort"])), ort_batch_mode(ort.fixed_batch, batch))


@dataclass(frozen=True)
class Benchmark:
    performance: Performance
    memory: Memory
    times: dict[str, list[float]]  # every timed batch-1 run, ms: "ort" and "torch"


def step_benchmark(opts: Options, dev: DeviceSetup, ort: OrtEngine, x: np.ndarray, say: _Steps) -> Benchmark:
    threads = opts.engine.threads  # the effective count: run() resolved it
    say.start(f"Benchmark: {opts.warmup} warm-up + {opts.runs} timed runs each, interleaved, {threads} CPU thread(s)")
    engine = dev.engine
    xt = engine.to_device(x)
    engine.prepare(xt)  # captured or compiled before the timing, whatever --warmup says
    sync = lambda: devices.synchronize(dev.device)  # noqa: E731
    with NoiseProbe(threads) as probe:  # how busy the machine was while we timed
        times = interleaved({"ort": lambda: ort.run(x), "torch": lambda: engine.runner(xt)}, runs=opts.runs,
                            warmup=opts.warmup, sync=sync, rotate=False,
                            after_warmup=lambda: devices.reset_peak_memory(dev.device))
        throughput = [_throughput(ort, engine, x, b, opts.runs) for b in opts.batch_sizes]
    performance = Performance(
        ort_cpu=latency_stats(times["ort"]), torch=latency_stats(times["torch"]), device_type=dev.device.type,
        throughput=throughput, threads=threads, model_form=opts.engine.model_form, fast_path=engine.fast_path,
        operators=dev.operators,
        extra={"fast_path_details": engine.fast_path_stats().to_dict(), **probe.result.to_dict()},
    )
    mem = memory(devices.peak_memory_mb(dev.device), *devices.process_rss_mb())
    say.detail(f"ORT CPU median {performance.ort_cpu.median_ms:.2f} ms, PyTorch {dev.device.type} median "
               f"{performance.torch.median_ms:.2f} ms, speed-up x{performance.speedup_median:.2f}; "
               f"{probe.result.describe()}")
    return Benchmark(performance, mem, times)


def step_write(opts: Options, src: ModelSource, parity: Parity, bench: Benchmark, size: Size,
               say: _Steps) -> list[str]:
    from PIL import Image

    from modnet_npu.proof.figures import benchmark_chart, comparison_chart, png_bytes

    say.start(f"Write {opts.output_dir}")
    performance = bench.performance
    tag = performance.device_type
    worst = parity.summary.worst  # the single image, or the worst of many
    note = None
    if len(parity.summary.results) > 1:
        note = (f"shown: the worst of {len(parity.summary.results)} cases, {os.path.basename(worst.case.path)} "
                f"at {worst.case.size[0]}x{worst.case.size[1]}")
    images = {
        "test_input.png": Image.fromarray(worst.model_rgb),
        "matte_ort_cpu.png": Image.fromarray(to_uint8(worst.ort_matte)),
        f"matte_{tag}.png": Image.fromarray(to_uint8(worst.torch_matte)),
    }
    for name, img in images.items():
        write_image(os.path.join(opts.output_dir, name), img)
    charts = {
        "comparison.png": comparison_chart(worst.model_rgb, worst.ort_matte, worst.torch_matte,
                                           device=str(bench.performance.device_type), accuracy=parity.accuracy,
                                           synthetic=src.source == "synthetic", note=note),
        "benchmark.png": benchmark_chart(performance, bench.times,
                                         f"MODNet {size[0]}x{size[1]}, batch 1, {opts.runs} interleaved runs"),
    }
    for name, fig in charts.items():
        write_bytes(os.path.join(opts.output_dir, name), png_bytes(fig))
    files = {**images, **charts}
    written = list(files)
    if parity.layerwise is not None:
        from modnet_npu.proof.layerwise import layerwise_figure

        write_json(os.path.join(opts.output_dir, "layerwise.json"), parity.layerwise.to_dict())
        layerwise_figure(parity.layerwise, os.path.join(opts.output_dir, "layerwise.png"))
        written += ["layerwise.json", "layerwise.png"]
    return sorted(written + ["evaluation_report.json"])


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
        warning=src.warning, download_attempts=list(src.attempts), package=src.package, member=src.member,
    )


@dataclass(frozen=True)
class Outcome:
    report: Report
    layerwise: LayerwiseReport | None  # when it ran: its table is printed


def run(opts: Options) -> Outcome:
    """Run the whole pipeline; returns the report (also written to disk) and the layerwise comparison."""
    started = time.perf_counter()
    # 0: the CPUs free now; never above the CPUs (process_setup's policy, as every tool)
    opts = replace(opts, engine=replace(opts.engine, threads=effective_threads(opts.engine.threads)))
    say = _Steps(opts.log)
    # temporaries a killed earlier run left in the output folder (older than any live one)
    clean_stale_parts(opts.output_dir, older_than=time.time() - STALE_AFTER_S)
    devices.select_device(opts.engine.device)  # a missing device fails now, not after the slow steps
    # each route asked for is installed (one line and stop, if not), before the slow steps
    plan = routes.plan_routes(opts.routes, precision=opts.route_precision, soc_version=opts.soc_version,
                              device=opts.engine.device)
    src = step_model(opts, say)
    converted = step_convert(src, say)
    analysis = step_analyse(opts, converted, say)
    dev = step_device(opts, converted, analysis.size, say)
    opened = routed = None
    try:
        # after torch_npu has the device (its options first), before anything is timed
        opened = routes.open_routes(plan, model_path=src.path, model_sha256=src.sha256,
                                    input_name=converted.conversion.report.input_name,
                                    sizes=[c.size for c in analysis.cases], torch_engine=dev.engine,
                                    cache_dir=os.path.join(opts.engine.models_dir, ".om-cache"),
                                    threads=opts.engine.threads, log=say.detail)
        ort = OrtEngine(src.path, threads=opts.engine.threads, validate=False)  # converted in step 2
        parity = step_parity(opts, src, converted.conversion, analysis, dev, ort, say)
        bench = step_benchmark(opts, dev, ort, parity.x, say)
        if opened is not None:
            routed = opened.measure(parity.summary.results, ort=ort, torch_bounds=_bounds(opts),
                                    mae_threshold=opts.mae_threshold, max_threshold=opts.max_threshold,
                                    runs=opts.runs, warmup=opts.warmup, threads=opts.engine.threads, log=say.detail)
        outputs = step_write(opts, src, parity, bench, analysis.size, say)
        if routed is not None:
            from modnet_npu.routes.chart import write_routes_figure

            outputs = sorted(outputs + write_routes_figure(routed, opts.output_dir))
    finally:
        if opened is not None:
            opened.close()
        dev.engine.close()
    r = converted.conversion.report
    report = Report(
        model=_model_info(src, analysis.arch, converted.conversion),
        environment=dev.environment,
        input=_input_info(parity.summary.worst.case),
        conversion=ConversionInfo(r.num_units, r.num_folded_batchnorms, r.num_source_tensors_used,
                                  [n for n, _ in r.leftovers]),
        accuracy=parity.accuracy, performance=bench.performance, memory=bench.memory, outputs=outputs,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        duration_s=round(time.perf_counter() - started, 2), routes=routed,
    )
    write_json(os.path.join(opts.output_dir, "evaluation_report.json"), report.to_dict())
    return Outcome(report, parity.layerwise)


def _input_info(case: Case) -> InputInfo:
    return InputInfo(os.path.abspath(case.path), list(case.rgb.shape[:2]), list(case.size))
