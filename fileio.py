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
import tempfile
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str = ".part") -> Iterator[str]:
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
