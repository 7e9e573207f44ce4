"""One command: adapt MODNet to the accelerator, prove it faithful, measure it.

``python3 run_npu_inference.py`` gets the ONNX model, converts it to the
hand-written PyTorch MODNet, analyses its graph, runs ONNX Runtime on the CPU
and PyTorch on the device side by side on a real portrait, benchmarks both, and
writes ``output/``: the input, both mattes, a comparison figure, a latency
chart and ``evaluation_report.json``. The steps live in ``pipeline``; this file
parses the command line and prints.

Importable for notebooks, as the seed shows::

    from run_npu_inference import build_torch_model_from_onnx, preprocess, postprocess
"""
from __future__ import annotations

if __name__ == "__main__":  # as a command, not imported: bound OpenMP's spinning before torch loads
    from modnet_npu.runtime.process_setup import configure_openmp

    configure_openmp()

import argparse
import os
import sys
from dataclasses import replace
from typing import Sequence

from modnet_npu.cli import EXIT_CHECK_FAILED, Parser, lazy_exports, run_command
from modnet_npu.errors import UsageError
from modnet_npu.fileio import check_output_folder
from modnet_npu.matting.imaging import parse_size_spec, postprocess, preprocess
from modnet_npu.proof.options import ENGINE_DEFAULTS, Options
from modnet_npu.routes import ROUTE_PRECISIONS, parse_routes
from modnet_npu.runtime.options import DEVICE_CHOICES, compile_cache_dir, add_engine_arguments, engine_options_from
from modnet_npu.source.resolve import check_local

# ruff: noqa: F822  (the names of __all__ that the module does not bind come from __getattr__ below)
__all__ = ["build_torch_model_from_onnx", "preprocess", "postprocess", "compare_layers", "main"]
# imported on first use (the pipeline loads torch and onnx): --help and a bad option are answered without them
__getattr__, __dir__ = lazy_exports(__name__, {
    "modnet_npu.conversion.convert": ("build_torch_model_from_onnx",),
    "modnet_npu.proof.layerwise": ("compare_layers",),
    "modnet_npu.proof.pipeline": ("banner", "run"),
    "modnet_npu.proof.report": ("summary_table",),
})

# Engine options that do not apply: both engines run; the model input sizes are --size/--sizes below; the
# parity run is always strict fp32; --no-synthetic-fallback says the opposite of --allow-synthetic.
_NOT_ENGINE = ("backend", "size", "max_side", "strict_fp32", "allow_synthetic")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
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


def _routes(text: str) -> tuple[str, ...]:
    try:
        return parse_routes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_route_options(p: argparse.ArgumentParser, d: Options) -> None:
    """--routes, --soc-version, --route-precision (modnet_npu.routes; docs/ASCEND.md)."""
    p.add_argument("--routes", type=_routes, default=d.routes,
                   help="Ascend routes side by side, comma-separated: torch (this project's PyTorch model on "
                        "--device), ort-cann (ONNX Runtime's CANN provider on the ONNX file; needs "
                        "onnxruntime-cann and CANN), om (the file compiled by ATC, run by ais_bench or ACL; needs "
                        "the CANN toolkit). Each is checked against ONNX Runtime CPU and timed in one interleaved "
                        "loop; the pipeline's own PyTorch run always happens. A route that cannot run here stops "
                        "the run with one line")
    p.add_argument("--soc-version", default=None,
                   help="the chip for ATC's --soc_version (om route), e.g. Ascend910B3 (default: what the device "
                        "says: torch_npu, else npu-smi info)")
    p.add_argument("--route-precision", choices=list(ROUTE_PRECISIONS), default=d.route_precision,
                   help="precision of the ort-cann and om routes: fp32 kept (precision_mode=must_keep_origin_dtype; "
                        "ATC --precision_mode_v2=origin) or native (each route's own mode: fp16 on GE and ATC)")


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = Parser(description="Convert MODNet ONNX to PyTorch, verify it against ONNX Runtime, benchmark, and report.")
    add_engine_arguments(p, omit=_NOT_ENGINE, defaults=ENGINE_DEFAULTS, help={
        "offline": "never download; use the cache or the generated model",
        "device": f"the PyTorch side's device: {DEVICE_CHOICES}",
        "precision": "PyTorch-side precision",
        "model_form": "PyTorch model measured: the optimized model (BatchNorms folded, fewer launches) or the "
                      "faithful module-for-module port",
        "threads": "CPU threads for both engines (0 = automatic: the CPUs other processes leave free at the start; "
                   "more than this process may use is clamped)",
        "compile": "compile the PyTorch side: AOTInductor on CPU/CUDA (packages cached in models/.compile-cache, "
                   "so only the first run per input shape pays), torchair on NPU",
        "graphs": "graph capture of fixed shapes on CUDA/NPU (auto: where available)",
    })
    p.add_argument("--no-synthetic-fallback", action="store_true",
                   help="fail instead of using a generated model when the default model id cannot be downloaded")
    p.add_argument("--image", action="append", default=None,
                   help=f"input image for the parity run (repeatable; default {d.image})")
    p.add_argument("--images", action="append", default=None, metavar="DIR",
                   help="run parity on every image of this folder too (repeatable)")
    p.add_argument("--size", default=None,
                   help="model input for dynamic graphs: auto, N (short side) or HxW; static graphs use their own")
    p.add_argument("--sizes", default=None,
                   help="several model inputs for dynamic graphs, comma-separated, e.g. 256,512,768x1024")
    p.add_argument("--alphas", default=None, metavar="DIR",
                   help="ground-truth alpha mattes matched to the images by file stem: adds MSE, MAD, SAD, gradient "
                        "and connectivity errors of both engines")
    p.add_argument("--layerwise", action="store_true",
                   help="compare every layer with ONNX Runtime (always done once when parity fails); writes "
                        "layerwise.json and layerwise.png")
    p.add_argument("--layer-threshold", type=float, default=None,
                   help="relative error that marks a layer's divergence (default 1e-4 fp32, 1e-2 fp16, 5e-2 bf16)")
    p.add_argument("--runs", type=_positive_int, default=d.runs, help="timed runs per engine")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed warm-up runs per engine")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=d.batch_sizes, help="throughput batch sizes, e.g. 1,8")
    p.add_argument("--mae-threshold", type=float, default=None,
                   help="parity passes below this MAE (default 1e-3 for fp32, 2e-3 for fp16, 1e-2 for bf16)")
    p.add_argument("--max-threshold", type=float, default=d.max_threshold, help="parity passes below this max error")
    p.add_argument("--output-dir", default=d.output_dir, help="where the outputs go")
    p.add_argument("--timeout", type=float, default=d.timeout, help="download time-out per attempt, seconds")
    p.add_argument("--retries", type=_positive_int, default=d.retries, help="download attempts")
    _add_route_options(p, d)
    return p


def options_from(args: argparse.Namespace) -> Options:
    """Options from parsed arguments, every value checked now (before any slow step); UsageError otherwise."""
    engine = engine_options_from(args, base=replace(ENGINE_DEFAULTS, allow_synthetic=not args.no_synthetic_fallback))
    sizes = tuple(s.strip() for s in (args.sizes or "").split(",") if s.strip())
    try:
        for spec in ([args.size] if args.size is not None else []) + list(sizes):
            parse_size_spec(spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.sizes is not None and not sizes:
        raise UsageError("--sizes needs at least one size, e.g. 256,512")
    if args.layer_threshold is not None and not args.layer_threshold > 0:
        raise UsageError(f"--layer-threshold must be positive, got {args.layer_threshold}")
    if args.alphas is not None and not os.path.isdir(args.alphas):
        raise UsageError(f"--alphas {args.alphas}: not a folder")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    if not args.output_dir.strip():
        raise UsageError("--output-dir must not be empty")
    check_output_folder(args.output_dir)  # a file, /dev/null, /proc: refused now, not at the last step
    check_local(engine.model)  # a missing local model file: one line now, not after torch and onnx load
    return Options(engine=engine, images=tuple(args.image or ()),
                   image_dirs=tuple(args.images or ()), size=args.size, sizes=sizes, alphas=args.alphas,
                   layerwise=args.layerwise, layer_threshold=args.layer_threshold, runs=args.runs,
                   warmup=args.warmup, batch_sizes=args.batch_sizes, mae_threshold=args.mae_threshold,
                   max_threshold=args.max_threshold, output_dir=args.output_dir, timeout=args.timeout,
                   retries=args.retries, routes=args.routes, soc_version=args.soc_version,
                   route_precision=args.route_precision)


def _print_outcome(outcome, output_dir: str) -> int:
    from modnet_npu.proof.pipeline import banner
    from modnet_npu.proof.report import summary_table

    report = outcome.report
    print()
    print(summary_table(report))
    if outcome.layerwise is not None:
        print(f"\nlayer by layer (the ten worst; first divergence: {outcome.layerwise.first_divergence or 'none'}, "
              f"worst local error: {outcome.layerwise.worst_local}):")
        print(outcome.layerwise.worst_table(10))
    print(f"\nwrote {', '.join(report.outputs)} to {output_dir}")
    if report.model.warning:
        print(banner(report.model.warning + " (recorded in evaluation_report.json)"))
    if not report.accuracy.passed:
        failing = report.accuracy.extra.get("aggregate", {}).get("failing", [])
        where = f" on {', '.join(failing)}" if failing else ""
        print(f"error: parity FAILED{where}: PyTorch output differs from ONNX Runtime beyond the thresholds",
              file=sys.stderr)
        return EXIT_CHECK_FAILED
    if report.routes is not None and report.routes.failing:
        print(f"error: parity FAILED on route(s) {', '.join(report.routes.failing)}: their output differs from "
              "ONNX Runtime CPU beyond the thresholds (see the routes table)", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _main(args: argparse.Namespace) -> int:
    opts = options_from(args)
    from modnet_npu.runtime.process_setup import setup_process

    e = opts.engine
    settings = setup_process(threads=e.threads, compile_cache_dir=compile_cache_dir(e.models_dir))
    # the effective count (0 = the CPUs free now; clamped)
    opts = replace(opts, engine=replace(e, threads=settings.threads))
    pipeline = sys.modules[__name__].run  # looked up on the module, where a test may have replaced it
    return _print_outcome(pipeline(opts), opts.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the pipeline, print; every failure one ``error:`` line and the shared exit status
    (``modnet_npu.cli``); a parity failure exits 3 after the report is written."""
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
