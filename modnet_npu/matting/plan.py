"""Which inputs a run reads and where each output goes: the plan, made before any work.

The naming rule (one owner; ``inference.py`` and the Ray path both use it):

* An input's outputs go to ``OUT/<folders>/<stem>_<mode>.<ext>``, where
  ``<folders>`` is its path relative to the folder named on the command line
  (nothing for a file named directly), kept exactly as it is (``my.dir/a.jpg``
  lands in ``OUT/my.dir/``).
* Inputs that would share a stem in one output folder but differ in extension
  (``photo.jpg``, ``photo.png``) each keep it: ``photo_jpg_<mode>``, ``photo_png_<mode>``.
* Names are compared ignoring case and Unicode normalisation, so a plan is the
  same on every file system (``A.jpg`` and ``a.png`` keep their extensions too).
* Inputs whose outputs would still share a name (``A/x.jpg`` and ``B/x.jpg`` named
  as files; ``a.jpg``, ``a.png`` and ``a_jpg.png`` in one folder) are not matted:
  each gets one error line naming the other(s). Nothing is overwritten silently.
* An output that would replace an input file (``in.png`` with ``in_matte.png``
  also given as an input) is never written: that input's job fails with one line.
  Inputs are the files a run reads: in a folder that is both input and output,
  files named like this tool's outputs (``<stem>_<mode>.png`` ...) are taken for an
  earlier run's outputs, not read, and replaced by ``--overwrite`` like any output.
* An output name longer than the file system takes (255 bytes) fails its input at once.
* One file named twice (or both directly and inside a named folder) is matted once.
* Only regular files are read: FIFOs, sockets and devices are skipped when
  walking folders and refused when named directly (they could block a run forever).
"""
from __future__ import annotations

import os
import re
import stat
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Iterator, NamedTuple, Sequence

from modnet_npu.fileio import NAME_MAX, is_temp_name
from modnet_npu.matting.matter import MODES
from modnet_npu.matting.codec import FORMATS  # noqa: F401  (re-exported: callers know the formats by the plan)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}
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
    errors: list[str]  # one line per input that cannot be run (missing, not a file, a name clash)
    excluded: list[str]  # files in the inputs that this tool wrote, not read back


class Found(NamedTuple):
    path: str  # as the user named it (or found under a folder they named)
    rel: str  # the part of the path kept under the output folder
    kind: str  # "image" or "video"


def is_regular_file(path: str) -> bool:
    """A regular file (through symlinks): never a FIFO, socket or device, which could block a read forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _walk(folder: str, recursive: bool, skip: str | None = None) -> Iterator[str]:
    """Regular files of ``folder`` in a stable order, never descending into ``skip`` (the output folder)."""
    skip = os.path.realpath(skip) if skip else None
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip)
            yield from (p for p in (os.path.join(root, n) for n in sorted(files)) if is_regular_file(p))
    else:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if is_regular_file(path):
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


def _found(inputs: Sequence[str], out_dir: str, recursive: bool) -> tuple[list[Found], list[str], list[str]]:
    """Every input file (each file once), error lines for inputs that cannot be read, own outputs left out."""
    found, errors, excluded, seen = [], [], [], set()
    out_real = os.path.realpath(out_dir)
    for item in inputs:
        if os.path.isdir(item):
            candidates = []
            for path in _walk(item, recursive, skip=out_dir):
                kind = _kind(path)
                if kind is not None and _written_here(path, out_real):
                    excluded.append(path)
                elif kind is not None:
                    candidates.append(Found(path, os.path.relpath(path, item), kind))
        elif is_regular_file(item):
            candidates = [Found(item, os.path.basename(item), _kind(item) or "image")]
        else:
            errors.append(f"{item}: " + ("not a regular file" if os.path.exists(item) else "no such file or folder"))
            continue
        for f in candidates:
            if _identity(f.path) not in seen:
                seen.add(_identity(f.path))
                found.append(f)
    return found, errors, excluded


def _identity(path: str) -> tuple[int, int] | str:
    """What makes two paths one file: device and inode (hard links, symlinks), else the real path."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return os.path.realpath(path)


def _key(path: str) -> str:
    """A name as a case-insensitive, normalising file system sees it (macOS, Windows)."""
    return unicodedata.normalize("NFC", path).casefold()


def _output_stems(found: Sequence[Found]) -> list[str]:
    """Each input's output stem (its folders kept): the stem, or ``<stem>_<ext>`` when an input
    with another extension shares it (two ``x.jpg`` from two folders stay ``x`` and clash)."""
    exts: dict[str, set[str]] = defaultdict(set)
    for f in found:
        stem, ext = os.path.splitext(f.rel)
        exts[_key(stem)].add(_key(ext))
    out = []
    for f in found:
        folder, name = os.path.split(f.rel)
        stem, ext = os.path.splitext(name)
        if len(exts[_key(os.path.splitext(f.rel)[0])]) > 1:
            stem = f"{stem}_{ext.lstrip('.')}"
        out.append(os.path.join(folder, stem))
    return out


def _output_path(out_dir: str, stem: str, mode: str, kind: str, fmt: str) -> str:
    if kind == "video":
        ext = "mov" if mode == "cutout" else "mp4"  # ProRes 4444 keeps the alpha channel
    else:
        ext = "png" if mode == "cutout" and fmt == "jpg" else fmt  # JPEG has no alpha
    return os.path.join(out_dir, f"{stem}_{mode}.{ext}")


class _Names:
    """Who writes each output name, and which names are inputs: to find the clashes of a plan."""

    def __init__(self, jobs: Sequence[Job], found: Sequence[Found]) -> None:
        self.jobs = jobs
        self.inputs: dict[object, str] = {_identity(f.path): f.path for f in found}
        self.inputs.update({_key(os.path.abspath(f.path)): f.path for f in found})  # a symlink itself is replaced
        self.owners: dict[str, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            for path in job.outputs.values():
                self.owners[_key(os.path.abspath(path))].append(i)

    def input_at(self, path: str) -> str | None:
        """The input an output path would replace: the same name, or the same file through a link."""
        named = self.inputs.get(_key(os.path.abspath(path)))
        return named if named is not None or not os.path.exists(path) else self.inputs.get(_identity(path))

    def problem(self, i: int, path: str) -> str | None:
        """The error line for job ``i`` writing ``path``, or None."""
        source = self.jobs[i].source
        others = [self.jobs[j].source for j in dict.fromkeys(self.owners[_key(os.path.abspath(path))]) if j != i]
        if others:
            return (f"{source}: its output {path} would also be written for {', '.join(others)}; not matted "
                    "(rename one, or run them with different -o folders)")
        victim = self.input_at(path)
        if victim is not None:
            return f"{source}: its output {path} is the input {victim}; not written (inputs are never replaced)"
        name = os.path.basename(path)
        if len(os.fsencode(name)) > NAME_MAX:
            return f"{source}: its output name {name[:40]}… is longer than {NAME_MAX} bytes"
        return None


def _clashes(jobs: Sequence[Job], found: Sequence[Found]) -> dict[int, str]:
    """Error lines by job index: outputs shared by two inputs, outputs that would replace an input."""
    names = _Names(jobs, found)
    problems: dict[int, str] = {}
    for i, job in enumerate(jobs):
        for path in job.outputs.values():
            line = names.problem(i, path)
            if line is not None:
                problems[i] = line
                break
    return problems


def plan_jobs(inputs: Sequence[str], out_dir: str, modes: Sequence[str], fmt: str, recursive: bool) -> Plan:
    """Jobs with their output paths by the naming rule above; inputs that cannot run as error lines."""
    found, errors, excluded = _found(inputs, out_dir, recursive)
    jobs = [Job(f.path, f.kind, {m: _output_path(out_dir, stem, m, f.kind, fmt) for m in modes})
            for f, stem in zip(found, _output_stems(found), strict=True)]
    problems = _clashes(jobs, found)
    errors += [problems[i] for i in sorted(problems)]
    return Plan([j for i, j in enumerate(jobs) if i not in problems], errors, excluded)


def still_to_do(job: Job, overwrite: bool) -> Job | None:
    """The job with only the outputs that are missing (all with ``overwrite``); None when none is.

    Decided per file: after an interrupted run the missing modes are produced,
    the finished ones left alone.
    """
    if overwrite:
        return job
    missing = {m: p for m, p in job.outputs.items() if not os.path.exists(p)}
    return replace(job, outputs=missing) if missing else None
