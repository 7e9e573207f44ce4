"""Atomic file writing: every output of the project appears complete or not at all.

Writers get a temporary path in the destination's folder (so the final rename
is atomic on the same file system); it replaces the destination only when the
writer returns, and is removed on any failure or interruption. Also the checks
made before a run writes anything: an output folder that can take files
(:func:`check_output_folder`) and input read with a byte limit (:func:`read_capped`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import sys
import tempfile
from typing import IO, Any, Iterator

from modnet_npu.errors import ModnetError, UsageError

TEMP_SUFFIX = ".part"
# How old a temporary must be before a later run removes it. A live writer's file
# can sit unmodified for minutes (a stalled download between retries, a video whose
# encoder buffers 32 KB at a time at a frame per second), so the margin is generous.
STALE_AFTER_S = 3600.0
# What atomic_path names its temporaries: ".<base>.<random>.part<ext>" (mkstemp's
# random part is letters, digits and "_"). Only names of exactly this shape are
# ever cleaned up, so a user's ".notes.part" or "draft.part.png" is never touched.
_TEMP_NAME = re.compile(r"^\.(?P<base>.+)\.[A-Za-z0-9_]+\.part(?P<ext>\.[A-Za-z0-9]+)?$")


# The longest file name most file systems take, in bytes (ext4, XFS, btrfs, APFS, NTFS
# in UTF-16 units); a folder that reports its own limit is asked.
NAME_MAX = 255
# what a temporary adds to its base and extension besides the suffix: the leading dot and
# mkstemp's "." + 8 random characters (".<base>.<random>.part<ext>")
_RANDOM_PART = len("..") + 8


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str = TEMP_SUFFIX) -> Iterator[str]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` on success."""
    dest = os.fspath(dest)
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    prefix, end = temp_affixes(dest, suffix)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=end, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _name_max(folder: str) -> int:
    try:
        return min(NAME_MAX, os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or the folder does not say
        return NAME_MAX


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes in the file system's encoding, never inside a character."""
    data = os.fsencode(text)
    if len(data) <= limit:
        return text
    return data[: max(0, limit)].decode(sys.getfilesystemencoding(), "ignore")


def temp_affixes(dest: str | os.PathLike[str], suffix: str = TEMP_SUFFIX) -> tuple[str, str]:
    """The prefix and suffix of :func:`atomic_path`'s temporaries for ``dest`` (random part between).

    ``".<base>."`` and ``"<suffix><ext>"``: the real extension stays last (some
    writers pick the format by it), and the base is shortened so that the whole
    temporary name fits wherever the final name does (a 250-byte name has a
    temporary of at most 255 bytes, not 265).
    """
    dest = os.fspath(dest)
    base, ext = os.path.splitext(os.path.basename(dest))
    room = _name_max(os.path.dirname(os.path.abspath(dest))) - _RANDOM_PART - len(os.fsencode(suffix))
    if len(os.fsencode(ext)) > room // 2:  # an absurd extension: the base matters more for finding it
        ext = ""
    base = _cut(base, room - len(os.fsencode(ext))) or "x"
    return f".{base}.", f"{suffix}{ext}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_path`'s temporaries."""
    return _TEMP_NAME.match(os.path.basename(name)) is not None


def _stale_candidates(folder: str, recursive: bool) -> Iterator[str]:
    if recursive:
        for root, _dirs, files in os.walk(folder):  # os.walk does not follow symlinked folders
            yield from (os.path.join(root, f) for f in files if is_temp_name(f))
    else:
        with os.scandir(folder) as entries:
            yield from (e.path for e in entries if is_temp_name(e.name))


def clean_stale_parts(folder: str | os.PathLike[str], *, older_than: float, recursive: bool = False) -> list[str]:
    """Remove :func:`atomic_path` temporaries in ``folder`` last modified before ``older_than``.

    A run killed by SIGKILL (or a power cut) cannot run its ``finally``, so its
    hidden ``.<base>.<random>.part<ext>`` files stay behind. Entry points call
    this at start with a time well before their own start, so the temporaries a
    concurrent run is still writing (their mtimes move as they are written) are
    left alone. Only regular files whose name has exactly that shape are
    removed, never a symlink. Returns the removed paths; a folder that does not
    exist has nothing to clean.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for path in _stale_candidates(folder, recursive):
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_mtime < older_than:
                os.unlink(path)
                removed.append(path)
        except OSError:  # gone meanwhile (another run cleaned it), or not ours to remove
            continue
    return removed


def write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    write_bytes(dest, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_image(dest: str | os.PathLike[str], image: Any, **save_args: Any) -> None:
    """Save a PIL image (format from the destination's extension) atomically."""
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(
        os.path.splitext(os.fspath(dest))[1].lower(), "PNG"
    )
    image.save(buf, format=fmt, **save_args)
    write_bytes(dest, buf.getvalue())


# --------------------------------------------------------------------------
# checked before a run
# --------------------------------------------------------------------------


class InputTooLargeError(ModnetError, ValueError):
    """An input stream longer than the tool's byte limit (``cat /dev/zero | inference.py -``)."""


def read_capped(stream: IO[bytes], limit: int, what: str) -> bytes:
    """All of ``stream``, or InputTooLargeError once more than ``limit`` bytes came (read no further)."""
    chunks, total = [], 0
    while True:
        chunk = stream.read(min(1 << 20, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise InputTooLargeError(f"{what}: more than {limit} bytes; not read further")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_folder(path: str | os.PathLike[str], *, option: str = "--output-dir") -> None:
    """UsageError unless files can be created in ``path`` (or in the folder that would hold it).

    Made before anything slow, so a run never ends with every result lost at its
    last step: a regular file, ``/dev/null``, ``/proc`` or a read-only folder is
    refused now. A folder that does not exist is not created; its nearest existing
    parent must be a folder that takes files. The probe file is removed at once.
    """
    path = os.fspath(path)
    target = _nearest_existing(path)
    if os.path.exists(target) and not os.path.isdir(target):
        what = "is a file, not a folder" if os.path.isfile(target) else "is not a folder"
        raise UsageError(f"{option} {path}: " + (what if target == os.path.abspath(path) else f"{target} {what}"))
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=target)
    except OSError as exc:
        where = "" if target == os.path.abspath(path) else f" ({target})"
        raise UsageError(f"{option} {path}: cannot create files there{where}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
