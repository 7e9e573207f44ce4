"""Matting jobs: which inputs to read, where each output goes, and running them.

One owner for the rules every front end (``inference.py``, the Ray path) keeps:
output names (``<stem>_<mode>.<ext>``, folder structure kept), never reading
back what this tool wrote, deciding per output file what is still to do, atomic
writes, and one error line per failed input.
"""
from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np

from modnet_npu.fileio import is_temp_name
from modnet_npu.matting import codec
from modnet_npu.matting.imaging import ImageReadError, load_image
from modnet_npu.matting.matter import MODES, Matter, render

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}
FORMATS = ("png", "jpg", "webp")
# what this tool names its outputs: photo_matte.png, clip_cutout.mov ...
OWN_OUTPUT = re.compile(rf"_({'|'.join(MODES)})\.(png|jpg|webp|mp4|mov)$", re.IGNORECASE)


@dataclass
class Job:
    source: str  # a path, or "-" for stdin
    kind: str  # "image" or "video"
    outputs: dict[str, str] = field(default_factory=dict)  # mode -> output path


@dataclass(frozen=True)
class Plan:
    jobs: list[Job]
    errors: list[str]  # one line per input that does not exist
    excluded: list[str]  # files in the inputs that this tool wrote, not read back


def _walk(folder: str, recursive: bool, skip: str | None = None) -> Iterator[str]:
    """Files of ``folder`` in a stable order, never descending into ``skip`` (the output folder)."""
    skip = os.path.realpath(skip) if skip else None
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip)
            for name in sorted(files):
                yield os.path.join(root, name)
    else:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                yield path


def _kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def _written_here(path: str, out_real: str) -> bool:
    """A file this tool wrote: an output in the output folder (when it is also an input
    folder), or a temporary of an interrupted run anywhere (``.photo_matte.x1y2.part.png``)."""
    if is_temp_name(path):
        return True
    folder = os.path.realpath(os.path.dirname(path))
    return os.path.commonpath([folder, out_real]) == out_real and OWN_OUTPUT.search(path) is not None


def _found(inputs: Sequence[str], out_dir: str, recursive: bool) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """(path, relative name, kind) of every input file, missing inputs, and own outputs left out."""
    found, errors, excluded = [], [], []
    out_real = os.path.realpath(out_dir)
    for item in inputs:
        if os.path.isdir(item):
            for path in _walk(item, recursive, skip=out_dir):
                kind = _kind(path)
                if kind is None:
                    continue
                if _written_here(path, out_real):
                    excluded.append(path)
                    continue
                found.append((path, os.path.relpath(path, item), kind))
        elif os.path.isfile(item):
            found.append((item, os.path.basename(item), _kind(item) or "image"))
        else:
            errors.append(f"{item}: no such file or folder")
    return found, errors, excluded


def plan_jobs(inputs: Sequence[str], out_dir: str, modes: Sequence[str], fmt: str, recursive: bool) -> Plan:
    """Jobs with their output paths; missing inputs as error lines; own outputs excluded."""
    found, errors, excluded = _found(inputs, out_dir, recursive)
    # two inputs with one stem (photo.jpg, photo.png) keep their extension in the name
    stems: dict[str, int] = defaultdict(int)
    for _, rel, _ in found:
        stems[os.path.splitext(rel)[0]] += 1
    jobs = []
    for path, rel, kind in found:
        stem = os.path.splitext(rel)[0]
        if stems[stem] > 1:
            stem = rel.replace(".", "_")
        job = Job(path, kind)
        for mode in modes:
            if kind == "video":
                ext = "mov" if mode == "cutout" else "mp4"  # ProRes 4444 keeps the alpha channel
            else:
                ext = "png" if mode == "cutout" and fmt == "jpg" else fmt  # JPEG has no alpha
            job.outputs[mode] = os.path.join(out_dir, f"{stem}_{mode}.{ext}")
        jobs.append(job)
    return Plan(jobs, errors, excluded)


def still_to_do(job: Job, overwrite: bool) -> Job | None:
    """The job with only the outputs that are missing (all with ``overwrite``); None when none is.

    Decided per file: after an interrupted run the missing modes are produced,
    the finished ones left alone.
    """
    if overwrite:
        return job
    missing = {m: p for m, p in job.outputs.items() if not os.path.exists(p)}
    return replace(job, outputs=missing) if missing else None


def save_output(path: str, array: np.ndarray) -> None:
    """Write one output atomically, encoded as its extension asks (``codec``: the one encoder)."""
    codec.save(path, array)


def load_job(job: Job) -> tuple[Job, np.ndarray | None, str | None]:
    """(job, RGB or None, error line or None)."""
    try:
        return job, load_image(job.source), None
    except ImageReadError as exc:
        return job, None, str(exc)


def save_job(job: Job, rgb: np.ndarray, alpha: np.ndarray, background: str) -> str | None:
    """Write every output of ``job``; the error line, or None."""
    try:
        for mode, path in job.outputs.items():
            save_output(path, render(mode, rgb, alpha, background))
    except (OSError, ValueError, ImageReadError) as exc:
        return f"{job.source}: {exc}"
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


def _size_problem(matter: Matter, job: Job, rgb: np.ndarray) -> str | None:
    """The error line for an image whose model input would exceed the size limit (a
    100:1 panorama under ``--size 512``), so it fails alone instead of ending the run."""
    try:
        matter.model_size(*rgb.shape[:2])
    except ValueError as exc:
        return f"{job.source}: {exc}"
    return None


def process_image_batch(matter: Matter, jobs: Sequence[Job], background: str,
                        pool: IoPool | None = None) -> list[tuple[Job, str | None]]:
    """Read, matte (batched) and write a group of image jobs; returns (job, error or None)."""
    if pool is None:
        with IoPool() as own:
            return process_image_batch(matter, jobs, background, own)
    results: list[tuple[Job, str | None]] = []
    loaded = []
    for job, rgb, problem in pool.map(load_job, list(jobs)):
        problem = problem or _size_problem(matter, job, rgb)
        if problem:
            results.append((job, problem))
        else:
            loaded.append((job, rgb))
    if loaded:
        alphas = matter.mattes([rgb for _, rgb in loaded])
        problems = pool.map(save_job, [(job, rgb, alpha, background) for (job, rgb), alpha in zip(loaded, alphas, strict=True)])
        results += [(job, problem) for (job, _), problem in zip(loaded, problems, strict=True)]
    return results


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
             progress: Progress | None = None) -> RunSummary:
    """Run planned jobs (already reduced to what is still to do): images in batches, then videos."""
    from modnet_npu.matting.video import process_video

    progress = progress or Progress()
    failed = done = frames = 0
    started = time.perf_counter()
    images = [j for j in jobs if j.kind == "image"]
    with IoPool() as pool:
        for i in range(0, len(images), batch):
            group = images[i : i + batch]
            for _job, problem in process_image_batch(matter, group, background, pool):
                if problem:
                    failed += 1
                    progress.error(problem)
                else:
                    done += 1
            progress.files(len(group))
    for job in (j for j in jobs if j.kind == "video"):
        try:
            frames += process_video(matter, job, background, batch, temporal, on_frames=progress.frames,
                                    on_total=lambda n, job=job: progress.video_started(job, n))
            done += 1
        except (ImageReadError, ValueError, OSError) as exc:
            failed += 1
            progress.error(str(exc) if job.source in str(exc) else f"{job.source}: {exc}")
        finally:
            progress.video_finished()
        progress.files(1)
    return RunSummary(done, failed, 0, len(images), frames, time.perf_counter() - started)
