"""Pure image functions: reading any image into RGB, MODNet's pre- and
post-processing, and what is made from a matte (cutouts, composites).

No device, no model, no globals: arrays in, arrays out. Conventions: images are
``uint8`` RGB arrays of shape ``(H, W, 3)``; mattes are float32 ``(H, W)`` in
[0, 1]; sizes are ``(height, width)``.
"""
from __future__ import annotations

import io
import os
from typing import NamedTuple, Union

import numpy as np
from PIL import Image, ImageFile, ImageFilter, ImageOps, PngImagePlugin, UnidentifiedImageError

from modnet_npu.matting.area import resize_area
from modnet_npu.model.contract import MAX_MODEL_SIDE, SIZE_MULTIPLE
from modnet_npu.errors import ModnetError

REFERENCE_SIZE = 512  # MODNet's official inference rule
MODEL_FILE_SIZE = 256  # the seed's input size (the real modnet-webnn file has dynamic axes)

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]  # also bytearray and binary streams
Size = tuple[int, int]
Colour = tuple[int, int, int]  # (r, g, b), 0 to 255: a plain background, broadcast where it is blended


class ShortSide(NamedTuple):
    """A model input size given as its short side (the aspect follows the image)."""

    pixels: int


# what a user may ask for: "auto" (MODNet's rule), ShortSide(N), or an exact (height, width)
SizeSpec = Union[str, ShortSide, Size]


class ImageReadError(ModnetError, ValueError):
    """An input that is not a readable image."""


class _PngStreamWithoutTextLimits(PngImagePlugin.PngStream):
    """Pillow's PNG chunk reader, except that a text chunk over Pillow's limits is dropped.

    Pillow refuses the whole image when one zTXt/iTXt chunk inflates past
    ``MAX_TEXT_CHUNK`` (1 MB) or its text totals ``MAX_TEXT_MEMORY`` (64 MB):
    limits meant for the text, applied to pixels nobody here reads text for.
    The limits still bound what is kept; only the refusal goes.
    """

    def _lenient(self, read, pos: int, length: int) -> bytes:
        start = self.fp.tell()
        try:
            return read(pos, length)
        except ValueError:  # "Decompressed data too large" / "Too much memory used in text chunks"
            self.fp.seek(start)
            return ImageFile._safe_read(self.fp, length)  # the chunk's bytes, for its checksum

    def chunk_tEXt(self, pos: int, length: int) -> bytes:
        return self._lenient(super().chunk_tEXt, pos, length)

    def chunk_zTXt(self, pos: int, length: int) -> bytes:
        return self._lenient(super().chunk_zTXt, pos, length)

    def chunk_iTXt(self, pos: int, length: int) -> bytes:
        return self._lenient(super().chunk_iTXt, pos, length)


# PngImageFile looks PngStream up in its module each time it opens a file
PngImagePlugin.PngStream = _PngStreamWithoutTextLimits


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Any PIL mode to uint8 RGB; 16-bit and float images are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        gray = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def _from_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageReadError(f"array of shape {arr.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if arr.dtype == np.uint16:
        arr = np.round(arr / 257.0).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageReadError(f"array of dtype {arr.dtype} is not an image (expected uint8, uint16 or float)")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def _source(image: ImageLike) -> tuple[object, str]:
    """What PIL opens for ``image``, and how messages name it (never an object's repr)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return io.BytesIO(data), f"image data ({len(data)} bytes)"
    if hasattr(image, "read"):  # an open binary file or stream
        return image, str(getattr(image, "name", "") or "image stream")
    try:
        path = os.fspath(image)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"cannot read an image from a {type(image).__name__}") from None
    return path, str(path)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        # PIL's own words repeat the path, or print a BytesIO's repr for data
        return "format not recognised"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def load_image(image: ImageLike) -> np.ndarray:
    """Read a path, bytes, binary stream, PIL image or array into uint8 RGB ``(H, W, 3)``.

    Honours EXIF orientation; handles 8/16-bit, grayscale, RGBA (alpha dropped),
    palette and CMYK images. Raises ImageReadError naming the input.
    """
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, Image.Image):
        return _to_rgb8(ImageOps.exif_transpose(image) or image)
    src, what = _source(image)
    try:
        with Image.open(src) as img:
            img.load()
            oriented = ImageOps.exif_transpose(img) or img
            return _to_rgb8(oriented)
    except FileNotFoundError:
        raise ImageReadError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{what}: is a folder") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{what}: not a readable image ({_reason(exc)})") from None


# --------------------------------------------------------------------------
# MODNet pre- and post-processing
# --------------------------------------------------------------------------


def official_size(height: int, width: int, reference: int = REFERENCE_SIZE) -> Size:
    """MODNet's inference size rule: short side to 512 when it is above 512 or the
    long side is below 512, then each side rounded down to a multiple of 32."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) < reference or min(height, width) > reference:
        if width >= height:
            h, w = reference, int(width / height * reference)
        else:
            h, w = int(height / width * reference), reference
    else:
        h, w = height, width
    return max(SIZE_MULTIPLE, h - h % SIZE_MULTIPLE), max(SIZE_MULTIPLE, w - w % SIZE_MULTIPLE)


def short_side_size(height: int, width: int, short_side: int) -> Size:
    """Scale so the short side is ``short_side``, then round each side down to a multiple of 32."""
    if short_side < SIZE_MULTIPLE:
        raise ValueError(f"short side must be at least {SIZE_MULTIPLE}, got {short_side}")
    scale = short_side / min(height, width)
    h, w = int(height * scale), int(width * scale)
    return max(SIZE_MULTIPLE, h - h % SIZE_MULTIPLE), max(SIZE_MULTIPLE, w - w % SIZE_MULTIPLE)


def resolve_size(size: int | Size | str, height: int, width: int) -> Size:
    """``'auto'`` -> the official rule; an int -> square; a pair -> itself (checked)."""
    if isinstance(size, str):
        if size != "auto":
            raise ValueError(f"size must be 'auto', an int or (height, width), got {size!r}")
        return official_size(height, width)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"model input size must be positive multiples of {SIZE_MULTIPLE}, got {h}x{w}")
    return h, w


def parse_size_spec(text: str, *, max_side: int = MAX_MODEL_SIDE) -> SizeSpec:
    """``auto``, ``N`` (the short side) or ``HxW`` -> a :data:`SizeSpec`; ValueError naming the text.

    The one parser of ``--size`` for every tool and the service.
    """
    text = str(text).strip().lower()
    if text == "auto":
        return "auto"
    parts = text.split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"size must be auto, N (short side) or HxW, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < SIZE_MULTIPLE or max(values) > max_side:
        raise ValueError(f"size {text!r} out of range: each side must be {SIZE_MULTIPLE}..{max_side} pixels")
    if len(values) == 1:
        return ShortSide(values[0])
    if values[0] % SIZE_MULTIPLE or values[1] % SIZE_MULTIPLE:
        raise ValueError(f"size {text!r}: height and width must be multiples of {SIZE_MULTIPLE}")
    return values[0], values[1]


def input_size(spec: SizeSpec, height: int, width: int, *, max_side: int = MAX_MODEL_SIDE) -> Size:
    """The model input size for an image of ``height`` x ``width`` under ``spec``."""
    if isinstance(spec, ShortSide):
        size = short_side_size(height, width, spec.pixels)
    else:
        size = resolve_size(spec, height, width)
    if max(size) > max_side:
        raise ValueError(f"model input {size[0]}x{size[1]} exceeds the limit of {max_side} pixels per side")
    return size


def resize_rgb(rgb: np.ndarray, size: Size) -> np.ndarray:
    """The official ONNX demo's resampling, ``cv2.INTER_AREA`` (:mod:`area`), shrinking or growing."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return resize_area(rgb, size)


def normalize(rgb: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3), uint8 or float in [0, 255] -> float32 (3, H, W) in [-1, 1]: (x / 255 - 0.5) / 0.5."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1))


def model_input(rgb: np.ndarray, size: Size) -> np.ndarray:
    """uint8 RGB -> the model's float32 (3, h, w) input at ``size``, resampled before any rounding.

    As the official demo: rounding the resized image to 8 bits first moves the
    matte by more than one level on 0.4-6.6% of a photo's pixels (docs/REAL_MODEL.md).
    """
    if rgb.shape[:2] == tuple(size):
        return normalize(rgb)
    return normalize(resize_area(rgb.astype(np.float32), size))


def preprocess(image: ImageLike, size: int | Size | str = MODEL_FILE_SIZE) -> tuple[np.ndarray, Size]:
    """Image -> (model input ``float32 [1, 3, h, w]``, original ``(height, width)``).

    ``size``: 256 (the seed's size) by default, any
    multiple of 32, a ``(height, width)`` pair, or ``'auto'`` for MODNet's
    official rule.
    """
    rgb = load_image(image)
    original = (int(rgb.shape[0]), int(rgb.shape[1]))
    target = resolve_size(size, *original)
    return model_input(rgb, target)[None], original


def matte_to_size(matte: np.ndarray, size: Size) -> np.ndarray:
    """Float matte -> float32 (H, W) at ``size`` (``cv2.INTER_AREA``, as the official demo), clipped to [0, 1]."""
    m = np.asarray(matte, dtype=np.float32)
    while m.ndim > 2:
        if m.shape[0] != 1:
            raise ValueError(f"expected one matte, got an array of shape {np.shape(matte)}")
        m = m[0]
    h, w = size
    if m.shape != (h, w):
        m = resize_area(m, (h, w))
    return np.clip(m, 0.0, 1.0)


def to_uint8(matte: np.ndarray) -> np.ndarray:
    return np.round(np.clip(matte, 0.0, 1.0) * 255.0).astype(np.uint8)


def postprocess(output: np.ndarray, original_size: Size) -> np.ndarray:
    """Model output ``[1, 1, h, w]`` -> 8-bit matte ``(H, W)`` at the original size."""
    return to_uint8(matte_to_size(output, original_size))


# --------------------------------------------------------------------------
# what is made from a matte
# --------------------------------------------------------------------------


def cutout(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """RGBA uint8 (H, W, 4): the image with the matte as its alpha channel."""
    _check_pair(rgb, alpha)
    return np.concatenate([rgb, to_uint8(alpha)[..., None]], axis=2)


def parse_color(text: str) -> tuple[int, int, int]:
    """'#00ff00', '#0f0', 'white', 'rgb(0,255,0)' ... -> (r, g, b); ValueError naming the text."""
    from PIL import ImageColor

    try:
        return tuple(ImageColor.getrgb(text.strip())[:3])  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"{text!r} is not a colour (try '#00ff00' or 'white')") from None


def cover(background: np.ndarray, size: Size) -> np.ndarray:
    """Scale ``background`` to cover ``size`` (keeping its aspect) and crop the centre.

    The centre region is cut from the source first and only that is resized, so
    no more than ``size`` pixels are ever built: scaling a 5000x100 strip to cover
    4000x3000 first would make a 150000x3000 image (4.3 GB measured) to keep 1/37 of it.
    """
    h, w = size
    bh, bw = background.shape[:2]
    if (bh, bw) == (h, w):
        return background
    scale = max(h / bh, w / bw)
    ch, cw = h / scale, w / scale  # the source region that covers the output, in source pixels
    top, left = (bh - ch) / 2, (bw - cw) / 2
    box = (left, top, left + cw, top + ch)
    return np.asarray(Image.fromarray(background).resize((w, h), Image.Resampling.BILINEAR, box=box))


def blurred(rgb: np.ndarray, radius: float | None = None) -> np.ndarray:
    """The image itself, Gaussian-blurred (radius ~2% of its longer side by default)."""
    r = radius if radius is not None else max(2.0, 0.02 * max(rgb.shape[:2]))
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(r)))


def make_background(spec: str | np.ndarray | Colour, rgb: np.ndarray) -> np.ndarray | Colour:
    """A background for ``rgb``: 'blur', an image path or an array (scaled to cover), or a colour (a name or
    ``(r, g, b)``), which stays a colour: :func:`composite` broadcasts it."""
    size = rgb.shape[:2]
    if isinstance(spec, tuple):
        return spec
    if isinstance(spec, np.ndarray):
        return cover(load_image(spec), size)
    if spec == "blur":
        return blurred(rgb)
    if os.path.exists(spec):
        return cover(load_image(spec), size)
    return parse_color(spec)


def _colour_vector(colour: Colour) -> np.ndarray:
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise ValueError(f"a background colour is (r, g, b), each 0 to 255, got {colour!r}")
    return np.array(colour, np.float32)


def composite(rgb: np.ndarray, alpha: np.ndarray, background: np.ndarray | Colour, rows: int = 256) -> np.ndarray:
    """alpha * image + (1 - alpha) * background, uint8 RGB.

    ``background``: an image (scaled to cover when its size differs) or a colour
    ``(r, g, b)``, broadcast over each band as it is blended (no background of
    the image's size is made, nor converted to float band by band: the same
    float32 arithmetic, the same result). Computed ``rows`` rows at a time: the
    float temporaries of a whole 12-megapixel photo would take ~0.6 GB for a
    36 MB result.
    """
    _check_pair(rgb, alpha)
    colour = _colour_vector(background) if isinstance(background, tuple) else None
    if colour is None and background.shape[:2] != rgb.shape[:2]:
        background = cover(background, rgb.shape[:2])
    out = np.empty(rgb.shape[:2] + (3,), np.uint8)
    for top in range(0, rgb.shape[0], rows):
        part = slice(top, top + rows)
        a = np.clip(alpha[part], 0, 1)[..., None].astype(np.float32)
        back = colour if colour is not None else background[part, :, :3].astype(np.float32)
        out[part] = np.round(rgb[part, :, :3].astype(np.float32) * a + back * (1 - a))
    return out


def _check_pair(rgb: np.ndarray, alpha: np.ndarray) -> None:
    if rgb.shape[:2] != alpha.shape[:2]:
        raise ValueError(f"image {rgb.shape[:2]} and matte {alpha.shape[:2]} differ in size")


def one_frame_delay(prev: np.ndarray, cur: np.ndarray, nxt: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """MODNet's one-frame-delay (OFD) trick against flicker.

    Where the previous and next frames agree and the current one differs from
    both by more than ``threshold``, the current value is a flicker: replace it
    by the neighbours' mean.
    """
    agree = np.abs(prev - nxt) <= threshold
    off = (np.abs(cur - prev) > threshold) & (np.abs(cur - nxt) > threshold)
    fix = agree & off
    out = cur.copy()
    out[fix] = 0.5 * (prev[fix] + nxt[fix])
    return out
