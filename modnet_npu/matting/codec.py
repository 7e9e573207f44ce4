"""Image outputs as bytes: the one encoder of every tool (files, the service, stdout).

``inference.py`` writing files (``jobs.save_output``) and a PNG to stdout, and the
service answering a request, all encode here, so the same matte comes out as the
same bytes: PNG lossless (zlib level 1: fast); JPEG and RGB WebP at quality 95; RGBA WebP lossless (a
cutout's alpha must not be blurred). JPEG has no alpha channel: :func:`encode`
writes an RGBA array as PNG when JPEG is asked (:func:`output_format` says so first).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

from modnet_npu.fileio import write_bytes

FORMATS = ("png", "jpg", "webp")
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
QUALITY = 95
# zlib level of every PNG written. Pillow's default (6) spent 105 ms on the portrait's 512x512 RGBA
# cutout, 1 spends 23 ms for a file 11% larger (459 kB instead of 413 kB; an 8-bit matte: 2.7 ms
# against 3.8 ms, 13.1 kB against 11.2 kB; 2-core EPYC, median of 5): the encoding was a quarter
# of a request to the service, and a cutout on disk or on the wire is worth that speed.
PNG_COMPRESS_LEVEL = 1


def _has_alpha(array: np.ndarray) -> bool:
    return array.ndim == 3 and array.shape[2] == 4


def output_format(array: np.ndarray, fmt: str) -> str:
    """The format ``array`` is written in when ``fmt`` is asked: ``fmt``, but PNG for an RGBA array as JPEG."""
    if fmt not in _PIL_FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    return "png" if fmt == "jpg" and _has_alpha(array) else fmt


@dataclass(frozen=True)
class Encoded:
    data: bytes
    format: str  # what was written (see output_format)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


def encode(array: np.ndarray, fmt: str = "png") -> Encoded:
    """uint8 ``array`` (H, W), (H, W, 3) or (H, W, 4) encoded as ``fmt`` (see :func:`output_format`)."""
    from PIL import Image

    fmt = output_format(array, fmt)
    args: dict = {}
    if fmt == "jpg" or (fmt == "webp" and not _has_alpha(array)):
        args = {"quality": QUALITY}
    elif fmt == "webp":
        args = {"lossless": True}
    else:
        args = {"compress_level": PNG_COMPRESS_LEVEL}
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=_PIL_FORMATS[fmt], **args)
    return Encoded(buf.getvalue(), fmt)


def format_of(path: str) -> str:
    """The format a file name asks for, by its extension; ValueError for one this tool does not write."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise ValueError(f"{path}: cannot write {ext or 'a file without extension'}; use .png, .jpg or .webp")
    return _EXTENSIONS[ext]


def save(path: str, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically, encoded as its extension asks (never PNG bytes in a .jpg)."""
    fmt = format_of(path)
    if output_format(array, fmt) != fmt:
        raise ValueError(f"{path}: JPEG has no alpha channel; write the cutout as .png or .webp")
    write_bytes(path, encode(array, fmt).data)
