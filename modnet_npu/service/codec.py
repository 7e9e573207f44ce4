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
from modnet_npu.matting import codec as matting_codec
from modnet_npu.matting import foreground
from modnet_npu.service.params import MatteParams

WEBP_MAX_SIDE = 16383  # libwebp's limit
MAX_PARTS = 64  # multipart parts in one body: an upload needs a handful
# a multipart text field named "background" is a colour or "blur" when it is this short and printable
_MAX_SPEC_BYTES = 256

# --------------------------------------------------------------------------
# pure work done on the I/O threads
# --------------------------------------------------------------------------


def probe_image(data: bytes | bytearray, max_pixels: int, what: str = "image") -> tuple[int, int]:
    """(width, height) read from the header, before anything is decoded: 413 over ``max_pixels``
    (a decompression bomb is a few KB), 415 for anything that is not an image."""
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
    return width, height


def decode_image(data: bytes | bytearray, max_pixels: int, what: str = "image") -> np.ndarray:
    """uint8 RGB from encoded bytes, the header checked first (:func:`probe_image`)."""
    probe_image(data, max_pixels, what)
    return decode_probed(data, what)


def decode_probed(data: bytes | bytearray, what: str = "image") -> np.ndarray:
    """uint8 RGB from encoded bytes whose header :func:`probe_image` has already passed."""
    try:
        return load_image(bytes(data) if isinstance(data, bytearray) else data)
    except ImageReadError as exc:
        raise ApiError(415, f"{what}: {str(exc).removeprefix('stdin: ')}") from None


def check_output(fmt: str, width: int, height: int) -> None:
    """422 for a result the format cannot hold (WebP: at most 16383 pixels a side), before any work is done."""
    if fmt == "webp" and max(width, height) > WEBP_MAX_SIDE:
        raise ApiError(422, f"format webp: a {width}x{height} image is over WebP's {WEBP_MAX_SIDE} pixels a side; "
                            "ask for png or jpg")


def over_colour(rgb: np.ndarray, alpha: np.ndarray, rgba: tuple[int, ...], rows: int = 256) -> np.ndarray:
    """The cutout laid over a colour with its own opacity (rembg's ``bgc``); RGBA, as rembg answers.

    Blended ``rows`` at a time: the float temporaries stay a band's size, not the image's.
    """
    if rgba[3] == 255:
        opaque = render("composite", rgb, alpha, tuple(rgba[:3]))
        return np.concatenate([opaque, np.full((*opaque.shape[:2], 1), 255, np.uint8)], axis=2)
    if rgba[3] == 0:
        return cutout(rgb, alpha)
    b = np.float32(rgba[3] / 255.0)
    colour = np.array(rgba[:3], np.float32)
    out = np.empty((*rgb.shape[:2], 4), np.uint8)
    for top in range(0, rgb.shape[0], rows):
        band = slice(top, top + rows)
        a = np.clip(alpha[band], 0, 1)[..., None].astype(np.float32)
        out_a = a + (1 - a) * b
        blended = (rgb[band].astype(np.float32) * a + colour * (1 - a) * b) / np.maximum(out_a, 1e-6)
        out[band, :, :3] = np.round(blended)
        out[band, :, 3:] = np.round(out_a * 255)
    return out


def render_bytes(params: MatteParams, rgb: np.ndarray, alpha: np.ndarray,
                 background_image: np.ndarray | None) -> tuple[bytes, str]:
    """The encoded result and its content type."""
    if params.decontaminate:
        rgb = foreground.decontaminate(params.mode, rgb, alpha)
    if params.mode == "composite" and isinstance(params.background, tuple) and len(params.background) == 4:
        array = over_colour(rgb, alpha, params.background)
    else:
        # an uploaded image, else the colour (broadcast as it is blended) or "blur"
        background = background_image if background_image is not None else params.background
        array = render(params.mode, rgb, alpha, background)
    return encode(array, params.format)


def encode(array: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """Bytes in ``fmt`` (JPEG has no alpha: RGBA goes out as PNG) and their content type: the one encoder,
    ``modnet_npu.matting.codec``, that files and stdout use too."""
    encoded = matting_codec.encode(array, fmt)
    return encoded.data, encoded.content_type


class _TooManyParts(Exception):
    pass


def _text_spec(value: bytes) -> str | None:
    """``value`` as text when it is a short printable line (a colour, ``blur``), else None (image bytes)."""
    if len(value) > _MAX_SPEC_BYTES or not value.isascii():
        return None
    text = value.decode("ascii")
    return text if text.isprintable() else None


def parse_multipart(body: bytes | bytearray, content_type: str,
                    max_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """(text fields, file fields) of a multipart/form-data body, all in memory (the body is bounded already).

    At most :data:`MAX_PARTS` parts (413 past them: the parse stops there, so a
    body of a million tiny parts costs no more than one of 64). A part without a
    file name is a text field, except ``file`` (an image sent as
    ``curl -F 'file=<photo.jpg'``) and ``background`` when its value is not a
    short printable line: ``-F background='#1e88e5'`` and ``-F background=blur``
    are specs, ``-F 'background=<beach.jpg'`` is an image.
    """
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import FormParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    parts = 0

    def count() -> None:
        nonlocal parts
        parts += 1
        if parts > MAX_PARTS:
            raise _TooManyParts

    def on_field(f: Any) -> None:
        count()
        name = (f.field_name or b"").decode("utf-8", "replace")
        value = f.value or b""
        spec = _text_spec(value) if name == "background" else None
        if name == "file" or (name == "background" and spec is None):
            files[name] = value
        else:
            fields[name] = spec if spec is not None else value.decode("utf-8", "replace")

    def on_file(f: Any) -> None:
        count()
        f.file_object.seek(0)
        files[(f.field_name or b"").decode("utf-8", "replace")] = f.file_object.read()

    config = {"MAX_MEMORY_FILE_SIZE": max_bytes + 1, "MAX_BODY_SIZE": max_bytes}
    try:
        parser = FormParser("multipart/form-data", on_field, on_file, boundary=boundary, config=config)
        parser.write(body)
        parser.finalize()
    except _TooManyParts:
        raise ApiError(413, f"multipart body with more than {MAX_PARTS} parts") from None
    except (FormParserError, ValueError) as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    return fields, files
