"""Atomic file writing: every output of the project appears complete or not at all.

Writers get a temporary path in the destination's folder (so the final rename
is atomic on the same file system); it replaces the destination only when the
writer returns, and is removed on any failure or interruption.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import tempfile
from typing import Any, Iterator

TEMP_SUFFIX = ".part"
# How old a temporary must be before a later run removes it. A live writer's file
# can sit unmodified for minutes (a stalled download between retries, a video whose
# encoder buffers 32 KB at a time at a frame per second), so the margin is generous.
STALE_AFTER_S = 3600.0
# What atomic_path names its temporaries: ".<base>.<random>.part<ext>" (mkstemp's
# random part is letters, digits and "_"). Only names of exactly this shape are
# ever cleaned up, so a user's ".notes.part" or "draft.part.png" is never touched.
_TEMP_NAME = re.compile(r"^\.(?P<base>.+)\.[A-Za-z0-9_]+\.part(?P<ext>\.[A-Za-z0-9]+)?$")


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
    # keep the real extension last: some writers pick the format by extension
    base, ext = os.path.splitext(os.path.basename(dest))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f"{suffix}{ext}", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
