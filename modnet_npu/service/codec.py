"""Bytes in and out: decoding uploads (with the pixel limit checked first), rendering and
encoding results, and reading multipart bodies. Pure functions, run on the I/O threads.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from modnet_npu.matting.imaging import ImageReadError, cutout, load_image
from modnet_npu.matting.matter import render
from modnet_npu.service.limits import ApiError
from modnet_npu.service.params import CONTENT_TYPES, MatteParams

# --------------------------------------------------------------------------
# pure work done on the I/O threads
# --------------------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> np.ndarray:
    """uint8 RGB from encoded bytes: 413 over ``max_pixels`` (checked from the header, before
    decoding: a decompression bomb is a few KB), 415 for anything that is not an image."""
    if not data:
        raise ApiError(415, f"{what}: empty; send an image file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise ApiError(413, f"{what}: too many pixels (over {max_pixels})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError(415, f"{what}: not an image (PNG, JPEG, WebP, BMP, TIFF, GIF ...)") from None
    if width * height > max_pixels:
        raise ApiError(413, f"{what}: {width}x{height} is {width * height / 1e6:.1f} MP, over the limit of "
                            f"{max_pixels / 1e6:g} MP")
    try:
        return load_image(data)
    except ImageReadError as exc:
        raise ApiError(415, f"{what}: {str(exc).removeprefix('stdin: ')}") from None


def over_colour(rgb: np.ndarray, alpha: np.ndarray, rgba: tuple[int, ...]) -> np.ndarray:
    """The cutout laid over a colour with its own opacity (rembg's ``bgc``); RGB when opaque."""
    if rgba[3] == 255:
        background = np.broadcast_to(np.array(rgba[:3], np.uint8), rgb.shape)
        return render("composite", rgb, alpha, np.ascontiguousarray(background))
    if rgba[3] == 0:
        return cutout(rgb, alpha)
    a = np.clip(alpha, 0, 1)[..., None].astype(np.float32)
    b = np.float32(rgba[3] / 255.0)
    out_a = a + (1 - a) * b
    colour = np.array(rgba[:3], np.float32)
    out = (rgb.astype(np.float32) * a + colour * (1 - a) * b) / np.maximum(out_a, 1e-6)
    return np.concatenate([np.round(out), np.round(out_a * 255)], axis=2).astype(np.uint8)


def render_bytes(params: MatteParams, rgb: np.ndarray, alpha: np.ndarray,
                 background_image: np.ndarray | None) -> tuple[bytes, str]:
    """The encoded result and its content type."""
    if params.mode == "composite" and isinstance(params.background, tuple) and len(params.background) == 4:
        array = over_colour(rgb, alpha, params.background)
    else:
        background: str | np.ndarray
        if background_image is not None:
            background = background_image
        elif isinstance(params.background, tuple):
            background = np.full((*rgb.shape[:2], 3), params.background, np.uint8)
        else:
            background = params.background  # "blur"
        array = render(params.mode, rgb, alpha, background)
    return encode(array, params.format)


def encode(array: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """Bytes in ``fmt`` (JPEG has no alpha: RGBA goes out as PNG), with the settings of ``jobs.save_output``."""
    if fmt == "jpg" and array.ndim == 3 and array.shape[2] == 4:
        fmt = "png"
    img = Image.fromarray(array)
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        rgba = array.ndim == 3 and array.shape[2] == 4
        img.save(buf, format="WEBP", **({"lossless": True} if rgba else {"quality": 95}))
    else:
        img.save(buf, format="PNG")
    return buf.getvalue(), CONTENT_TYPES[fmt]


def parse_multipart(body: bytes, content_type: str, max_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """(text fields, file fields) of a multipart/form-data body, all in memory (the body is bounded already)."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import FormParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}

    def on_field(f: Any) -> None:
        name = f.field_name.decode("utf-8", "replace")
        if name in ("file", "background"):  # an image sent without a file name (curl -F 'file=<photo.jpg')
            files[name] = f.value or b""
        else:
            fields[name] = (f.value or b"").decode("utf-8", "replace")

    def on_file(f: Any) -> None:
        f.file_object.seek(0)
        files[f.field_name.decode("utf-8", "replace")] = f.file_object.read()

    config = {"MAX_MEMORY_FILE_SIZE": max_bytes + 1, "MAX_BODY_SIZE": max_bytes, "MAX_FIELDS": 64}
    try:
        parser = FormParser("multipart/form-data", on_field, on_file, boundary=boundary, config=config)
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    return fields, files

