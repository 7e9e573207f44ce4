"""Matting jobs: running a plan (``plan``) of images and videos.

One owner for the rules every front end (``inference.py``, the Ray path) keeps
while running: atomic writes, decoded pixels in flight bounded, and one error
line per failed input (unreadable, too large for the memory, a model output
that is not finite), the others still written. What to read and where each
output goes is ``plan``'s (re-exported here for existing callers).
"""
from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from modnet_npu.cli import one_line
from modnet_npu.matting import codec, foreground, warmup
from modnet_npu.matting.imaging import ImageReadError, load_image
from modnet_npu.matting.matter import Matter, NonFiniteMatteError, render
from modnet_npu.runtime.engines import OrtRunError
from modnet_npu.matting.plan import (  # re-exported: the names callers knew jobs by
    FORMATS,
    IMAGE_EXTS,
    OWN_OUTPUT,
    VIDEO_EXTS,
    Job,
    Plan,
    is_regular_file,
    plan_jobs,
    still_to_do,
)
from modnet_npu.matting.video import process_video

__all__ = ["FORMATS", "IMAGE_EXTS", "OWN_OUTPUT", "VIDEO_EXTS", "Job", "Plan", "plan_jobs", "still_to_do",
           "IoPool", "Progress", "RunSummary", "load_job", "save_job", "save_output", "process_image_batch",
           "run_jobs", "PIXELS_IN_FLIGHT", "MAX_STDIN_BYTES"]

# Decoded pixels one --batch group may hold: the group is cut short when its images
# add up to more. A pixel costs ~20 bytes of peak memory on its way through the tool
# (RGB, PIL's copy, the float matte, the rendered output, the encoder's buffer;
# measured as the peak RSS of inference.py on a 24 MP JPEG, any one mode, ORT), so a
# group holds about 1.3 GB; a single larger image still runs, alone.
PIXELS_IN_FLIGHT = 64_000_000
# The most an image read from stdin (``inference.py -``) may be, in bytes: ten times the
# 21 MB of a noisy 24 MP JPEG at quality 90; ``cat /dev/zero | inference.py -`` ends here.
MAX_STDIN_BYTES = 200_000_000

def save_output(path: str, array: np.ndarray) -> None:
    """Write one output atomically, encoded as its extension asks (``codec``: the one encoder)."""
    codec.save(path, array)


# Out of memory for one file is that file's failure (a 100-megapixel photo under a memory
# cap), not the run's: the arrays it held are freed as the exception unwinds.
_OUT_OF_MEMORY = "out of memory (try a smaller --size or --max-side, or fewer processes beside this one)"


def load_job(job: Job) -> tuple[Job, np.ndarray | None, str | None]:
    """(job, RGB or None, error line or None)."""
    if os.path.exists(job.source) and not is_regular_file(job.source):  # replaced by a FIFO since the plan
        return job, None, f"{job.source}: not a regular file"
    try:
        return job, load_image(job.source), None
    except ImageReadError as exc:
        return job, None, str(exc)
    except MemoryError:
        return job, None, f"{job.source}: decoding it ran {_OUT_OF_MEMORY}"


def save_job(job: Job, rgb: np.ndarray, alpha: np.ndarray, background: str, *,
             decontaminate: bool = False) -> str | None:
    """Write every output of ``job`` (cutouts and composites with the foreground's own colours at soft
    edges when ``decontaminate``: ``foreground``); the error line, or None."""
    path = ""
    try:
        colours = foreground.colours_by_mode(job.outputs, rgb, alpha, decontaminate=decontaminate)
        for mode, path in job.outputs.items():
            save_output(path, render(mode, colours[mode], alpha, background))
    except OSError as exc:  # the reason, not the temporary's name or the errno
        return f"{job.source}: writing {path} failed: {exc.strerror or exc}"
    except (ValueError, ImageReadError, foreground.ForegroundUnavailable) as exc:  # pymatting: a Ray worker may lack it
        return f"{job.source}: {exc}"
    except MemoryError:
        return f"{job.source}: writing {path} ran {_OUT_OF_MEMORY}"
    return None


class IoPool:
    """Decode and encode a batch's images on threads (PIL releases the GIL); closed by ``with``."""

    def __init__(self, workers: int | None = None) -> None:
        self.pool = ThreadPoolExecutor(workers or max(2, min(8, os.cpu_count() or 2)))

    def map(self, fn: Callable, items: Sequence) -> list:
        call = (lambda item: fn(*item)) if items and isinstance(items[0], tuple) else fn
        if len(items) < 2:
            return [call(item) for item in items]
        return list(self.pool.map(call, items))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def __enter__(self) -> "IoPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def size_problem(matter: Matter, job: Job, rgb: np.ndarray) -> str | None:
    """The error line for an image whose model input would exceed the size limit (a
    100:1 panorama under ``--size 512``), so it fails alone instead of ending the run."""
    try:
        matter.model_size(*rgb.shape[:2])
    except ValueError as exc:
        return f"{job.source}: {exc}"
    return None


def mattes_or_errors(matter: Matter,
                     loaded: Sequence[tuple[Job, np.ndarray]]) -> list[tuple[np.ndarray | None, str | None]]:
    """(matte, None) or (None, error line) per image: a batch the model fails on (NaN or Inf out,
    out of memory, ONNX Runtime's arena full) is retried image by image, so only the images it
    fails on alone fail."""
    try:
        return [(alpha, None) for alpha in matter.mattes([rgb for _, rgb in loaded])]
    except (NonFiniteMatteError, OrtRunError, MemoryError) as exc:
        if len(loaded) == 1:
            why = f"inference ran {_OUT_OF_MEMORY}" if isinstance(exc, MemoryError) else str(exc)
            return [(None, f"{loaded[0][0].source}: {why}")]
    return [mattes_or_errors(matter, [item])[0] for item in loaded]


def process_image_batch(matter: Matter, jobs: Sequence[Job], background: str,
                        pool: IoPool | None = None, *, decontaminate: bool = False) -> list[tuple[Job, str | None]]:
    """Read, matte (batched) and write a group of image jobs; returns (job, error or None)."""
    if pool is None:
        with IoPool() as own:
            return process_image_batch(matter, jobs, background, own, decontaminate=decontaminate)
    results: list[tuple[Job, str | None]] = []
    loaded = []
    for job, rgb, problem in pool.map(load_job, list(jobs)):
        problem = problem or size_problem(matter, job, rgb)
        if problem:
            results.append((job, problem))
        else:
            loaded.append((job, rgb))
    matted = mattes_or_errors(matter, loaded) if loaded else []
    to_save = [(job, rgb, alpha, background) for (job, rgb), (alpha, _) in zip(loaded, matted, strict=True)
               if alpha is not None]
    results += [(job, problem) for (job, _), (alpha, problem) in zip(loaded, matted, strict=True) if alpha is None]
    problems = pool.map(functools.partial(save_job, decontaminate=decontaminate), to_save)
    results += [(item[0], problem) for item, problem in zip(to_save, problems, strict=True)]
    return results


def _groups(images: Sequence[Job], batch: int, pool: IoPool) -> list[list[Job]]:
    """Runs of at most ``batch`` images holding at most PIXELS_IN_FLIGHT decoded pixels (one image at least)."""
    if batch == 1:
        return [[job] for job in images]
    groups: list[list[Job]] = []
    pixels = 0
    for job, n in zip(images, pool.map(warmup.pixel_count, [job.source for job in images]), strict=True):
        if not groups or len(groups[-1]) >= batch or pixels + n > PIXELS_IN_FLIGHT:
            groups.append([])
            pixels = 0
        groups[-1].append(job)
        pixels += n
    return groups


# --------------------------------------------------------------------------
# a whole run
# --------------------------------------------------------------------------


class Progress:
    """What a run reports as it goes; the default reports nothing."""

    def files(self, n: int) -> None: ...

    def video_started(self, job: Job, frames: int | None) -> None: ...

    def frames(self, n: int) -> None: ...

    def video_finished(self) -> None: ...

    def error(self, line: str) -> None: ...


@dataclass(frozen=True)
class RunSummary:
    succeeded: int
    failed: int
    skipped: int
    images: int
    frames: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return (self.images + self.frames) / max(self.seconds, 1e-9)


def run_jobs(matter: Matter, jobs: Sequence[Job], *, background: str, batch: int = 1, temporal: bool = False,
             decontaminate: bool = False, progress: Progress | None = None,
             log: Callable[[str], None] = lambda m: None) -> RunSummary:
    """Run planned jobs (already reduced to what is still to do): images in batches, then videos.

    On a fast path made per shape the shapes the jobs need are prepared first (``warmup``; ``log`` gets the
    set and its cost), so nothing is compiled or captured inside a batch; the time counted starts after.
    ``decontaminate``: cutouts and composites with the foreground's own colours at soft edges.
    """
    progress = progress or Progress()
    failed = done = frames = 0
    images = [j for j in jobs if j.kind == "image"]
    with IoPool() as pool:
        ready = warmup.prepare(matter, warmup.plan_for(matter, jobs, batch, mapper=pool.map))
        if ready:
            log(f"warm-up: {ready}")
        started = time.perf_counter()
        for group in _groups(images, batch, pool):
            for _job, problem in process_image_batch(matter, group, background, pool, decontaminate=decontaminate):
                if problem:
                    failed += 1
                    progress.error(one_line(problem))  # a library message may span lines
                else:
                    done += 1
            progress.files(len(group))
    for job in (j for j in jobs if j.kind == "video"):
        try:
            frames += process_video(matter, job, background, batch, temporal, on_frames=progress.frames,
                                    on_total=lambda n, job=job: progress.video_started(job, n),
                                    decontaminate=decontaminate)
            done += 1
        except (ImageReadError, ValueError, OSError, MemoryError, OrtRunError) as exc:
            failed += 1
            why = f"ran {_OUT_OF_MEMORY}" if isinstance(exc, MemoryError) else str(exc)
            progress.error(one_line(why if job.source in why else f"{job.source}: {why}"))
        finally:
            progress.video_finished()
        progress.files(1)
    return RunSummary(done, failed, 0, len(images), frames, time.perf_counter() - started)
