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
import os
import sys
import time
from dataclasses import replace
from typing import Callable, Sequence

from modnet_npu.cli import Parser, run_command
from modnet_npu.errors import UsageError
from modnet_npu.fileio import STALE_AFTER_S, check_output_folder, clean_stale_parts, read_capped
from modnet_npu.matting import codec, foreground
from modnet_npu.matting.imaging import ImageReadError, load_image, parse_color
from modnet_npu.matting.jobs import FORMATS, MAX_STDIN_BYTES, Job, Progress, RunSummary, plan_jobs, run_jobs, still_to_do
from modnet_npu.matting.matter import MODES, Matter, render
from modnet_npu.runtime.options import EngineOptions, compile_cache_dir, add_engine_arguments, engine_options_from
from modnet_npu.source.resolve import DownloadError, ModelSourceError, resolve_or_fallback

__all__ = ["Matter", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="Portrait matting with MODNet: mattes, cutouts and new backgrounds for photos, folders and videos.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders, video files, or - (one image on stdin, PNG on stdout)")
    p.add_argument("-o", "--output-dir", default=None, help="output folder (required unless the input is -)")
    p.add_argument("--mode", action="append", choices=MODES, default=None,
                   help="what to write (repeatable): matte = 8-bit alpha, cutout = RGBA, composite = over --background "
                        "(default: cutout)")
    p.add_argument("--background", default="white",
                   help="composite background: a colour (#00ff00, white), an image file, or blur")
    p.add_argument("--batch", type=int, default=1, help="images (or video frames) of one size inferred together")
    p.add_argument("--format", choices=FORMATS, default="png",
                   help="image output format; cutouts stay PNG when jpg is asked")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--temporal", action="store_true", help="video: one-frame-delay smoothing against flicker")
    p.add_argument("--decontaminate", action="store_true",
                   help="cutout and composite: estimate the subject's own colour at soft edges (hair), so the old "
                        "background does not show through them (rembg's -dc; needs pymatting; about 0.05 s per "
                        "512x512 image and 0.6 s at 2000x1500 on one core, plus about 1.5 s to load pymatting)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-file messages")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: without ADDRESS a local Ray is started for the run and shut down after; auto or "
                        "ray://HOST:PORT uses a running cluster and leaves it running (pip install -r "
                        "requirements-ray.txt; put --ray after the inputs, or write --ray=ADDRESS)")
    add_engine_arguments(p)
    return p


def _check_args(args: argparse.Namespace, modes: list[str]) -> EngineOptions:
    """Every option checked before anything slow happens; the engine options. UsageError (exit status 2)
    for an option that is wrong in itself, ValueError (1) for a file that is not there."""
    stdin = args.inputs == ["-"]
    if "-" in args.inputs and not stdin:
        raise UsageError("- (stdin) cannot be mixed with other inputs")
    if stdin and len(modes) != 1:
        raise UsageError("with - (stdin) give exactly one --mode: stdout takes one PNG")
    if stdin and args.output_dir:
        raise UsageError("with - (stdin) the result goes to stdout; drop -o/--output-dir")
    if not stdin and not args.output_dir:
        raise UsageError("-o/--output-dir is required")
    if args.ray is not None:
        _check_ray(args.ray, stdin)
    if args.output_dir:
        check_output_folder(args.output_dir, option="-o")  # a file, /dev/null, /proc: refused before any work
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    if args.decontaminate:
        _check_decontaminate(modes)
    options = engine_options_from(args)
    if args.background != "blur" and not os.path.exists(args.background):
        looks_like_file = os.sep in args.background or os.path.splitext(args.background)[1] != ""
        if looks_like_file and not args.background.startswith("#"):
            raise ValueError(f"--background {args.background}: no such file")
        parse_color(args.background)
    return options


def _check_decontaminate(modes: list[str]) -> None:
    """--decontaminate changes colours: it needs a mode that has them, and pymatting (checked, not imported)."""
    if not any(mode in foreground.COLOUR_MODES for mode in modes):
        raise UsageError("--decontaminate changes the colours of cutout and composite outputs; "
                         "--mode matte has none")
    foreground.require("--decontaminate")


def _check_ray(address: str, stdin: bool) -> None:
    from modnet_npu.matting.scaleout import check_address

    if stdin:
        raise UsageError("--ray runs files and folders; - (stdin) runs here, without --ray")
    if os.path.exists(address):  # argparse gives --ray the next word when it is followed by an input
        raise UsageError(f"--ray took {address} as its ADDRESS; put --ray after the inputs, or write --ray=ADDRESS")
    try:
        check_address(address)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _info(args: argparse.Namespace) -> Callable[[str], None]:
    """Where progress messages go: stderr (above the progress bar while one is drawn: the warm-up's line comes
    with the bar up), or nowhere with --quiet (stdout may carry a PNG)."""
    if args.quiet:
        return lambda m: None
    from tqdm import tqdm

    return lambda m: tqdm.write(m, file=sys.stderr)


def _open_matter(args: argparse.Namespace, options: EngineOptions) -> Matter:
    from modnet_npu.runtime.process_setup import setup_process

    settings = setup_process(threads=options.threads, defer_torch=True,  # ONNX Runtime needs no torch
                             compile_cache_dir=compile_cache_dir(options.models_dir))
    return Matter(replace(options, threads=settings.threads), log=_info(args))


def _stdin_mode(matter: Matter, mode: str, background: str, decontaminate: bool) -> int:
    data = read_capped(sys.stdin.buffer, MAX_STDIN_BYTES, "stdin")
    if not data:
        raise ImageReadError("stdin: no data")
    try:
        rgb = load_image(data)
    except ImageReadError:
        raise ImageReadError(f"stdin: not a readable image ({len(data)} bytes)") from None
    alpha = matter.mattes([rgb])[0]
    colours = foreground.colours_by_mode([mode], rgb, alpha, decontaminate=decontaminate)[mode]
    sys.stdout.buffer.write(codec.encode(render(mode, colours, alpha, background), "png").data)
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


def _model_unavailable(exc: DownloadError, args: argparse.Namespace) -> ModelSourceError:
    """A failed download, said once: the attempts were printed above (unless --quiet), with what to do."""
    msg = "every download method failed (above)" if exc.attempts and not args.quiet else str(exc)
    if not args.allow_synthetic:
        msg += "; pass --model PATH to a local .onnx, or --allow-synthetic to test with a generated model"
    return ModelSourceError(msg)


def _main_ray(args: argparse.Namespace, options: EngineOptions, modes: list[str]) -> int:
    """--ray: the model resolved and the job planned here, run on the cluster (workers never download)."""
    from modnet_npu.matting import scaleout

    scaleout.require_ray()
    log = _info(args)
    source = resolve_or_fallback(options.model, options.models_dir, allow_synthetic=options.allow_synthetic,
                                 sha256=options.sha256, offline=options.offline, log=log)
    if source.warning:
        log(f"WARNING: {source.warning}")
    options = replace(options, model=source.path)  # the actors open this file: every other option as given
    return _run_folder(lambda todo, bars: scaleout.run_on_ray(
        todo, options=options, address=args.ray, background=args.background, batch=args.batch,
        temporal=args.temporal, decontaminate=args.decontaminate, progress=bars, log=log), args, modes)


def _main_local(args: argparse.Namespace, options: EngineOptions, modes: list[str]) -> int:
    with _open_matter(args, options) as matter:
        _info(args)(f"backend {matter.engine.name} ({matter.backend_reason}): {matter.engine.description}; "
                    f"model {matter.source.path} ({matter.source.source})")
        if args.inputs == ["-"]:
            return _stdin_mode(matter, modes[0], args.background, args.decontaminate)
        return _run_folder(lambda todo, bars: run_jobs(matter, todo, background=args.background, batch=args.batch,
                                                       temporal=args.temporal, decontaminate=args.decontaminate,
                                                       progress=bars, log=_info(args)), args, modes)


def _main(args: argparse.Namespace) -> int:
    modes = list(dict.fromkeys(args.mode or ["cutout"]))
    options = _check_args(args, modes)
    try:
        return _main_ray(args, options, modes) if args.ray is not None else _main_local(args, options, modes)
    except DownloadError as exc:
        raise _model_unavailable(exc, args) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, print; every failure one ``error:`` line and the shared exit status (``modnet_npu.cli``).
    SIGTERM and SIGHUP clean up as Ctrl-C does (``run_command``): no hidden temporaries left."""
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
