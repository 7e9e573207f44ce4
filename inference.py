"""Matte photos, folders and videos with MODNet, on PyTorch (NPU, CUDA, MPS,
CPU) or ONNX Runtime: the command line over ``matting``, ``jobs`` and ``video``.

Python API (re-exported here)::

    from inference import Matter
    matter = Matter(backend="auto", device="auto", allow_synthetic=True)
    alpha = matter.matte("photo.jpg")            # float32 (H, W) in [0, 1]

Command line: ``python3 inference.py INPUT... -o OUTDIR [options]``; with
``--ray [ADDRESS]`` the same job runs on a Ray cluster (``scaleout``).
"""
from __future__ import annotations

if __name__ == "__main__":  # as a command, not imported: bound OpenMP's spinning before torch loads
    from modnet_npu.runtime.process_setup import configure_openmp

    configure_openmp()

import argparse
import io
import os
import sys
import time
from typing import Callable, Sequence

from modnet_npu.runtime.engines import BACKEND_CHOICES
from modnet_npu.errors import ModnetError, UsageError
from modnet_npu.cli import interrupt_on_signals
from modnet_npu.fileio import STALE_AFTER_S, check_output_folder, clean_stale_parts, read_capped
from modnet_npu.matting.imaging import MAX_MODEL_SIDE, ImageReadError, load_image, parse_color, parse_size_spec
from modnet_npu.matting.jobs import FORMATS, MAX_STDIN_BYTES, Job, Progress, RunSummary, plan_jobs, run_jobs, still_to_do
from modnet_npu.matting.matter import MODES, Matter, render
from modnet_npu.source.resolve import DEFAULT_MODEL_ID, DEFAULT_MODELS_DIR, DownloadError, resolve_or_fallback
from modnet_npu.model.precision import PRECISIONS

__all__ = ["Matter", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Portrait matting with MODNet: mattes, cutouts and new backgrounds for photos, folders and videos.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders, video files, or - (one image on stdin, PNG on stdout)")
    p.add_argument("-o", "--output-dir", default=None, help="output folder (required unless the input is -)")
    p.add_argument("--mode", action="append", choices=MODES, default=None,
                   help="what to write (repeatable): matte = 8-bit alpha, cutout = RGBA, composite = over --background "
                        "(default: cutout)")
    p.add_argument("--background", default="white",
                   help="composite background: a colour (#00ff00, white), an image file, or blur (default: white)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="inference engine; auto = PyTorch on an accelerator, ONNX Runtime on a CPU-only machine")
    p.add_argument("--device", default="auto", help="auto|npu[:N]|cuda[:N]|mps|cpu (torch backend; default: auto)")
    p.add_argument("--model", default=DEFAULT_MODEL_ID,
                   help=f"local .onnx path, http(s) URL, or model id (default: {DEFAULT_MODEL_ID})")
    p.add_argument("--sha256", help="expected sha256 of the model file")
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help="download cache (default: models/)")
    p.add_argument("--offline", action="store_true", help="never download")
    p.add_argument("--allow-synthetic", action="store_true",
                   help="when the default model cannot be downloaded, use a generated one (meaningless mattes; "
                        "for testing)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="torch backend precision (half precision runs the decoder, the backbone stays fp32; "
                        "default: fp32)")
    p.add_argument("--batch", type=int, default=1,
                   help="images (or video frames) of one size inferred together (default: 1)")
    p.add_argument("--size", default="auto",
                   help="model input: auto (MODNet's rule: short side to 512 when larger, sides down to multiples "
                        "of 32), N (short side to N) or HxW; a static ONNX graph on ort uses its own size "
                        "(default: auto)")
    p.add_argument("--max-side", type=int, default=MAX_MODEL_SIDE,
                   help=f"largest model input side in pixels, a guard against runaway memory (default: {MAX_MODEL_SIDE})")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: 0 = the CPUs other processes leave free at the start)")
    p.add_argument("--strict-fp32", action="store_true",
                   help="torch backend: compute fp32 convolutions in full fp32. By default an Ascend 910B runs them "
                        "in HF32 and CUDA in TF32 (faster, fine for mattes); this turns that off "
                        "(ACL_PRECISION_MODE=must_keep_origin_dtype via torch_npu set_option, no HF32/TF32)")
    p.add_argument("--compile", action="store_true",
                   help="torch backend: compile (AOTInductor on CPU/CUDA, cached per input shape; torchair on NPU)")
    p.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                   help="torch backend: capture graphs of repeated shapes on CUDA/NPU (default: auto)")
    p.add_argument("--format", choices=FORMATS, default="png",
                   help="image output format; cutouts stay PNG when jpg is asked (default: png)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--temporal", action="store_true", help="video: one-frame-delay smoothing against flicker")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-file messages")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: without ADDRESS a local Ray is started for the run and shut down after; auto or "
                        "ray://HOST:PORT uses a running cluster and leaves it running (pip install -r "
                        "requirements-ray.txt; put --ray after the inputs, or write --ray=ADDRESS)")
    return p


class _UsageError(ValueError):
    """Options that do not fit together (exit status 2, as argparse's own)."""


def _check_args(args: argparse.Namespace, modes: list[str]) -> None:
    """Every option checked before anything slow happens; one line, _UsageError or ValueError."""
    stdin = args.inputs == ["-"]
    if "-" in args.inputs and not stdin:
        raise _UsageError("- (stdin) cannot be mixed with other inputs")
    if stdin and len(modes) != 1:
        raise _UsageError("with - (stdin) give exactly one --mode: stdout takes one PNG")
    if stdin and args.output_dir:
        raise _UsageError("with - (stdin) the result goes to stdout; drop -o/--output-dir")
    if not stdin and not args.output_dir:
        raise _UsageError("-o/--output-dir is required")
    if args.ray is not None:
        _check_ray(args.ray, stdin)
    if args.output_dir:
        check_output_folder(args.output_dir, option="-o")  # a file, /dev/null, /proc: refused before any work
    if args.batch < 1:
        raise _UsageError(f"--batch must be at least 1, got {args.batch}")
    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (all cores) or more, got {args.threads}")
    if args.max_side < 32:
        raise _UsageError(f"--max-side must be at least 32, got {args.max_side}")
    args.size = parse_size_spec(args.size, max_side=args.max_side)
    if args.background != "blur" and not os.path.exists(args.background):
        looks_like_file = os.sep in args.background or os.path.splitext(args.background)[1] != ""
        if looks_like_file and not args.background.startswith("#"):
            raise ValueError(f"--background {args.background}: no such file")
        parse_color(args.background)


def _check_ray(address: str, stdin: bool) -> None:
    from modnet_npu.matting.scaleout import check_address

    if stdin:
        raise _UsageError("--ray runs files and folders; - (stdin) runs here, without --ray")
    if os.path.exists(address):  # argparse gives --ray the next word when it is followed by an input
        raise _UsageError(f"--ray took {address} as its ADDRESS; put --ray after the inputs, or write --ray=ADDRESS")
    try:
        check_address(address)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _info(args: argparse.Namespace) -> Callable[[str], None]:
    """Where progress messages go: stderr, or nowhere with --quiet (stdout may carry a PNG)."""
    return (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))


def _open_matter(args: argparse.Namespace) -> Matter:
    from modnet_npu.runtime.process_setup import setup_process

    settings = setup_process(threads=args.threads, compile_cache_dir=os.path.join(args.models_dir, ".compile-cache"))
    return Matter(args.model, args.backend, args.device, args.precision, args.size, settings.threads, args.models_dir,
                  args.sha256, args.offline, args.allow_synthetic, args.compile, args.graphs, log=_info(args),
                  strict_fp32=args.strict_fp32, max_side=args.max_side)


def _stdin_mode(matter: Matter, mode: str, background: str) -> int:
    data = read_capped(sys.stdin.buffer, MAX_STDIN_BYTES, "stdin")
    if not data:
        raise ImageReadError("stdin: no data")
    try:
        rgb = load_image(data)
    except ImageReadError:
        raise ImageReadError(f"stdin: not a readable image ({len(data)} bytes)") from None
    alpha = matter.mattes([rgb])[0]
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(render(mode, rgb, alpha, background)).save(buf, format="PNG")
    sys.stdout.buffer.write(buf.getvalue())
    sys.stdout.buffer.flush()
    return 0


class _Bars(Progress):
    """tqdm bars on a terminal: one over files, one per video over frames."""

    def __init__(self, total: int, show: bool) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bar = tqdm(total=total, unit="file", file=sys.stderr) if show and total else None
        self.frame_bar = None

    def files(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def video_started(self, job: Job, frames: int | None) -> None:
        if self.bar is not None:
            self.frame_bar = self.tqdm(total=frames, unit="frame", desc=os.path.basename(job.source), leave=False,
                                       file=sys.stderr)

    def frames(self, n: int) -> None:
        if self.frame_bar is not None:
            self.frame_bar.update(n)

    def video_finished(self) -> None:
        if self.frame_bar is not None:
            self.frame_bar.close()
            self.frame_bar = None

    def error(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(f"error: {line}", file=sys.stderr)
        else:
            print(f"error: {line}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_folder(run: Callable[[list[Job], Progress], RunSummary], args: argparse.Namespace, modes: list[str]) -> int:
    """Plan, skip what is done, ``run`` the rest (here or on Ray), summarise: one path for both."""
    plan = plan_jobs(args.inputs, args.output_dir, modes, args.format, args.recursive)
    info = _info(args)
    # hidden temporaries a killed earlier run left (older than any live one of a concurrent run)
    removed = clean_stale_parts(args.output_dir, older_than=time.time() - STALE_AFTER_S, recursive=args.recursive)
    if removed:
        info(f"removed {len(removed)} stale temporary file(s) of an interrupted run from {args.output_dir}")
    for line in plan.errors:
        print(f"error: {line}", file=sys.stderr)
    if plan.excluded:
        info(f"left out {len(plan.excluded)} file(s) this tool wrote (e.g. {plan.excluded[0]})")
    if not plan.jobs and not plan.errors:
        print("error: no images or videos found in the inputs", file=sys.stderr)
        return 1
    todo, skipped = [], 0
    for job in plan.jobs:
        pending = still_to_do(job, args.overwrite)
        if pending is None:
            skipped += 1
            info(f"skipped {job.source}: outputs exist (use --overwrite)")
        else:
            todo.append(pending)
    bars = _Bars(len(todo), show=not args.quiet and sys.stderr.isatty())
    try:
        summary = run(todo, bars)
    finally:
        bars.close()
    failed = summary.failed + len(plan.errors)
    info(f"done: {summary.succeeded} succeeded, {failed} failed, {skipped} skipped; "
         f"{summary.images_per_s:.2f} images/s")
    return 1 if failed else 0


def _model_error(exc: Exception, args: argparse.Namespace) -> str:
    if not isinstance(exc, DownloadError):
        return str(exc)
    msg = "every download method failed (above)" if exc.attempts and not args.quiet else str(exc)
    if not args.allow_synthetic:
        msg += "; pass --model PATH to a local .onnx, or --allow-synthetic to test with a generated model"
    return msg


def _main_ray(args: argparse.Namespace, modes: list[str]) -> int:
    """--ray: the model resolved and the job planned here, run on the cluster (workers never download)."""
    from modnet_npu.matting import scaleout

    scaleout.require_ray()
    log = _info(args)
    source = resolve_or_fallback(args.model, args.models_dir, allow_synthetic=args.allow_synthetic,
                                 sha256=args.sha256, offline=args.offline, log=log)
    if source.warning:
        log(f"WARNING: {source.warning}")
    spec = scaleout.EngineSpec(source.path, args.backend, args.device, args.precision, args.size, args.threads,
                               args.compile, args.graphs, args.models_dir, args.strict_fp32, args.max_side)
    return _run_folder(lambda todo, bars: scaleout.run_on_ray(
        todo, spec=spec, address=args.ray, background=args.background, batch=args.batch,
        temporal=args.temporal, progress=bars, log=log), args, modes)


def _main_local(args: argparse.Namespace, modes: list[str]) -> int:
    with _open_matter(args) as matter:
        _info(args)(f"backend {matter.engine.name} ({matter.backend_reason}): {matter.engine.description}; "
                    f"model {matter.source.path} ({matter.source.source})")
        if args.inputs == ["-"]:
            return _stdin_mode(matter, modes[0], args.background)
        return _run_folder(lambda todo, bars: run_jobs(matter, todo, background=args.background, batch=args.batch,
                                                       temporal=args.temporal, progress=bars), args, modes)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt_on_signals()  # SIGTERM and SIGHUP clean up as Ctrl-C does: no hidden temporaries left
    modes = list(dict.fromkeys(args.mode or ["cutout"]))
    try:
        _check_args(args, modes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, (_UsageError, UsageError)) else 1
    try:
        return _main_ray(args, modes) if args.ray is not None else _main_local(args, modes)
    except (ModnetError, ValueError, OSError) as exc:
        print(f"error: {_model_error(exc, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; finished outputs are kept, no partial file is left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
