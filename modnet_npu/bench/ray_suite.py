"""The ``ray`` benchmark suite: inference.py's local path and ``--ray`` on this machine, side by side.

Per round, in alternating order: the local path (``jobs.run_jobs``, the model
already loaded, as inference.py's summary counts it) and ``scaleout.run_on_ray``
with each number of CPU actors, on one Ray started once. A Ray run's time
includes starting its actors and loading the model in each: the overhead every
run pays. Each run is reported whole (images/s over the run) and in its steady
state (files/s from its first finished file to its last, those finished with
the first left out: Ray's write tasks report several at once), so the fixed
cost and the rate are told apart. Ray's own start, and how long a missing
device takes to fail, are measured once.

    python3 -m modnet_npu.bench.ray_suite --count 48 --size 256 --rounds 3 --json out.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from modnet_npu import DEFAULT_IMAGE, REPO_ROOT
from modnet_npu.cli import Parser, run_command
from modnet_npu.errors import ModnetError, UsageError
from modnet_npu.matting.jobs import Job, Progress, plan_jobs, run_jobs


class RaySuiteError(ModnetError, RuntimeError):
    """The suite cannot measure what it is meant to on this machine."""


class _Clock(Progress):
    """When each file finished."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: list[float] = []

    def files(self, n: int) -> None:
        self.marks += [time.perf_counter() - self.start] * n


def _timed(run: Callable[[Progress], object], count: int) -> dict:
    clock = _Clock()
    run(clock)
    total = time.perf_counter() - clock.start
    first = clock.marks[0] if clock.marks else None
    span = clock.marks[-1] - first if first is not None else 0.0
    later = sum(1 for m in clock.marks if m > first) if first is not None else 0  # files arrive in bundles
    return {"seconds": total, "images_per_s": count / total, "first_file_s": first,
            "steady_images_per_s": later / span if span > 0 else None}


def _folder(root: str, image: str, count: int) -> str:
    from PIL import Image

    src = os.path.join(root, "in")
    os.makedirs(src)
    base = np.asarray(Image.open(image).convert("RGB"))
    for i in range(count):  # same size, different content
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(os.path.join(src, f"img{i:03d}.jpg"), quality=92)
    return src


def _fresh_jobs(src: str, out: str) -> list[Job]:
    shutil.rmtree(out, ignore_errors=True)  # every run writes everything
    return plan_jobs([src], out, ["matte"], "png", False).jobs


def _contenders(matter, options, src: str, root: str, actors: Sequence[int], batch: int) -> dict[str, Callable]:
    from modnet_npu.matting import scaleout

    def local(progress: Progress) -> object:
        return run_jobs(matter, _fresh_jobs(src, os.path.join(root, "local")), background="white", batch=batch,
                        progress=progress)

    def on_ray(n: int) -> Callable[[Progress], object]:
        return lambda progress: scaleout.run_on_ray(_fresh_jobs(src, os.path.join(root, f"ray{n}")), options=options,
                                                    batch=batch, actors=n, progress=progress)

    return {"local": local, **{f"ray_{n}_actor{'s' if n > 1 else ''}": on_ray(n) for n in actors}}


def _missing_device_s(options, jobs: list[Job]) -> float:
    """Seconds until a run asking for a GPU on this CPU-only Ray fails (the session already up)."""
    from modnet_npu.matting import scaleout

    start = time.perf_counter()
    try:
        scaleout.run_on_ray(jobs[:1], options=replace(options, backend="torch", device="cuda"))
    except scaleout.ScaleoutError:
        return time.perf_counter() - start
    raise RaySuiteError("a run asking for a GPU did not fail on this machine: it has one")


def suite_ray(model: str, image: str = DEFAULT_IMAGE, *, count: int = 48, size: int = 256, backend: str = "ort",
              rounds: int = 3, actors: Sequence[int] = (1, 2), batch: int = 1, threads: int = 0,
              log: Callable[[str], None] = print) -> dict:
    """Images/s of the local path and of --ray with each number of CPU actors, interleaved round by round."""
    from modnet_npu.matting import scaleout
    from modnet_npu.matting.matter import Matter
    from modnet_npu.runtime.options import EngineOptions

    options = EngineOptions(model=model, backend=backend, device="cpu", size=size, threads=threads)
    matter = Matter(options)
    from modnet_npu.proof.timing import idle_cpus

    idle_before = idle_cpus(1.0)  # Ray's own workers count as "others" later: only the machine before is telling
    root = tempfile.mkdtemp(prefix="bench_ray")
    short = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    try:
        src = _folder(root, image, count)
        start = time.perf_counter()
        with scaleout.ray_session(None, local=scaleout.LocalRay(object_store_mb=512, temp_dir=short)):
            ray_start_s = time.perf_counter() - start
            log(f"  Ray started in {ray_start_s:.1f} s")
            runs: dict[str, list[dict]] = {}
            contenders = _contenders(matter, options, src, root, actors, batch)
            for r in range(rounds):
                order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
                for name in order:
                    runs.setdefault(name, []).append(_timed(contenders[name], count))
                    log(f"  round {r + 1}/{rounds} {name}: {runs[name][-1]['images_per_s']:.2f} images/s")
            missing_s = _missing_device_s(options, _fresh_jobs(src, os.path.join(root, "none")))
    finally:
        matter.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(short, ignore_errors=True)
    return {"suite": "ray", "backend": matter.engine.description, "images": count, "model_input": f"short side {size}",
            "batch": batch, "cpus": os.cpu_count(), "idle_cpus_before": idle_before,
            "load_average_after": os.getloadavg()[0], "ray_start_s": ray_start_s, "missing_device_fail_s": missing_s,
            "runs": runs, "median": {k: _medians(v) for k, v in runs.items()}}


def _medians(runs: list[dict]) -> dict:
    keys = ("seconds", "images_per_s", "first_file_s", "steady_images_per_s")
    return {k: statistics.median(r[k] for r in runs) if all(r[k] is not None for r in runs) else None for k in keys}


def format_ray(result: dict) -> str:
    ref = result["median"]["local"]["images_per_s"]
    lines = ["| path | images/s (whole run) | vs local | first file | steady images/s |", "|---|---|---|---|---|"]
    for name, m in result["median"].items():
        steady = f"{m['steady_images_per_s']:.2f}" if m["steady_images_per_s"] else "-"
        lines.append(f"| {name} | {m['images_per_s']:.2f} | x{m['images_per_s'] / ref:.2f} | "
                     f"{m['first_file_s']:.1f} s | {steady} |")
    lines.append(f"\nRay start: {result['ray_start_s']:.1f} s; a missing device fails in "
                 f"{result['missing_device_fail_s']:.2f} s once Ray is up")
    idle = result["idle_cpus_before"]
    if idle is not None:
        lines.append(f"{idle:.1f} of {result['cpus']} CPUs idle before the runs; load average "
                     f"{result['load_average_after']:.1f} after" + (" - NOISY: timings unreliable"
                                                                     if idle < result["cpus"] - 0.5 else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="ONNX file with dynamic axes (default: the generated one)")
    p.add_argument("--image", default=DEFAULT_IMAGE)
    p.add_argument("--count", type=int, default=48, help="images per run")
    p.add_argument("--size", type=int, default=256, help="model input short side")
    p.add_argument("--backend", default="ort", choices=("ort", "torch"))
    p.add_argument("--actors", default="1,2", help="numbers of CPU actors compared")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from modnet_npu.runtime.process_setup import setup_process

    try:
        actors = [int(a) for a in args.actors.split(",")]
    except ValueError:
        raise UsageError(f"--actors: comma-separated whole numbers, got {args.actors!r}") from None
    setup_process(threads=0)
    model = args.model or _generated_model()
    result = suite_ray(model, args.image, count=args.count, size=args.size, backend=args.backend,
                       rounds=args.rounds, actors=actors, batch=args.batch)
    print(format_ray(result))
    if args.json:
        from modnet_npu.fileio import write_json

        command = "python3 -m modnet_npu.bench.ray_suite " + " ".join(sys.argv[1:] if argv is None else argv)
        write_json(args.json, result | {"command": command})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The suite alone; errors and exit statuses as every tool (``modnet_npu.cli``)."""
    return run_command(build_parser(), lambda args: _main(args, argv), argv)


def _generated_model() -> str:
    from modnet_npu.source import synthetic as synthetic_model

    path = os.path.join(REPO_ROOT, "models", "synthetic", "modnet_official.onnx")
    if not os.path.exists(path):
        synthetic_model.generate(os.path.dirname(path), ["official"])
    return path


if __name__ == "__main__":
    sys.exit(main())
