"""MODNet's two official demos, re-implemented (numpy only), and how a matte agrees with theirs.

What users compare this project with is what the official repository's demos
write, so their pre- and post-processing is reproduced here exactly as they do it
(ZHKKKe/MODNet, read 2026-12):

* ``onnx/inference_onnx.py`` (the ONNX demo): normalise ``(im - 127.5) / 127.5``
  in float64, resize by the scale factors of ``get_scale_factor`` (the official
  size rule, :func:`imaging.official_size`) with ``cv2.INTER_AREA``, run, write
  ``(matte * 255).astype('uint8')`` (truncation, not rounding), then resize that
  8-bit matte back to the photo's size with ``cv2.INTER_AREA``.
* ``demo/image_matting/colab/inference.py`` (the PyTorch demo): ``ToTensor`` and
  ``Normalize(0.5, 0.5)`` in float32, ``F.interpolate(mode='area')`` to the rule's
  size, run, ``F.interpolate(mode='area')`` of the float matte back to the photo's
  size, ``(matte * 255).astype('uint8')``.

``cv2.INTER_AREA`` is two different filters: when both sides shrink it averages
the source pixels each output pixel covers, weighted by the covered fraction
(``resizeArea``); otherwise it interpolates between two neighbours with
"area" coefficients (``resize`` with ``area_mode``: nearest-like inside a source
pixel, linear across its edges). ``F.interpolate(mode='area')`` is adaptive
average pooling (whole pixels from ``floor(i*in/out)`` to ``ceil((i+1)*in/out)``).
The area filter is :mod:`modnet_npu.matting.area` (the project's own resampling
since these comparisons); OpenCV's growing path on 8-bit data (the demo's matte)
is emulated here in its own 11-bit fixed point. Checked against
opencv-python-headless 5.0.0.93 and torch 2.13: float results equal to ~1e-7
(float32 arithmetic), 8-bit results identical but for the shrinking path's rare
exact ties (OpenCV sums in float32), which may round one level apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from modnet_npu.matting.area import grow_taps, resize_area
from modnet_npu.matting.imaging import Size, official_size

# a model run: float32 (1, 3, h, w) in [-1, 1] -> alpha of any shape holding h*w values
Infer = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------
# the resampling filters (cv2's area filter itself is matting.area's)
# --------------------------------------------------------------------------


def _area_linear_u8(img: np.ndarray, size: Size) -> np.ndarray:
    """cv2 INTER_AREA growing 8-bit (H, W) data, in OpenCV's fixed point: 11-bit weights, its SIMD vertical pass."""
    (ty, cy), (tx, cx) = grow_taps(img.shape[0], size[0]), grow_taps(img.shape[1], size[1])
    a = np.rint(cx.astype(np.float32) * np.float32(2048)).astype(np.int64)  # INTER_RESIZE_COEF_SCALE
    b = np.rint(cy.astype(np.float32) * np.float32(2048)).astype(np.int64)
    src = img.astype(np.int64)
    rows = src[:, tx[:, 0]] * a[:, 0] + src[:, tx[:, 1]] * a[:, 1]
    s0, s1 = rows[ty[:, 0]], rows[ty[:, 1]]
    out = (((b[:, :1] * (s0 >> 4)) >> 16) + ((b[:, 1:] * (s1 >> 4)) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def cv2_inter_area(img: np.ndarray, size: Size) -> np.ndarray:
    """``cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)``: float32 for float input, 8-bit for 8-bit."""
    (h_in, w_in), (h, w) = img.shape[:2], size
    if img.dtype == np.uint8 and img.ndim == 2 and not (h_in >= h and w_in >= w):
        return _area_linear_u8(img, size)
    return resize_area(img, size)


def _adaptive_avg_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``F.interpolate(mode='area')`` = adaptive average pooling over whole pixels, as taps."""
    starts = (np.arange(n_out) * n_in) // n_out
    ends = -((-(np.arange(n_out) + 1) * n_in) // n_out)
    k = int((ends - starts).max())
    idx = np.minimum(starts[:, None] + np.arange(k), ends[:, None] - 1)
    w = np.where(starts[:, None] + np.arange(k) < ends[:, None], 1.0 / (ends - starts)[:, None], 0.0)
    return idx, w


def _along64(x: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    x = np.moveaxis(x, axis, 0)
    out = np.zeros((idx.shape[0],) + x.shape[1:])
    for j in range(idx.shape[1]):
        out += w[:, j].reshape(-1, *(1,) * (x.ndim - 1)) * x[idx[:, j]]
    return np.moveaxis(out, 0, axis)


def torch_area(img: np.ndarray, size: Size) -> np.ndarray:
    """``F.interpolate(x, size, mode='area')`` of an (H, W[, C]) array, in float64."""
    x = np.asarray(img, dtype=np.float64)
    x = _along64(x, 0, *_adaptive_avg_taps(img.shape[0], size[0]))
    return _along64(x, 1, *_adaptive_avg_taps(img.shape[1], size[1]))


# --------------------------------------------------------------------------
# the two demos
# --------------------------------------------------------------------------


def _matte(out: np.ndarray, size: Size) -> np.ndarray:
    return np.asarray(out, dtype=np.float64).reshape(size)


def onnx_demo_matte(rgb: np.ndarray, infer: Infer) -> np.ndarray:
    """The 8-bit matte ``onnx/inference_onnx.py`` writes for uint8 RGB ``rgb``."""
    h, w = rgb.shape[:2]
    size = official_size(h, w)
    im = (rgb.astype(np.float64) - 127.5) / 127.5
    x = cv2_inter_area(im, size).transpose(2, 0, 1)[None].astype(np.float32)
    matte8 = (_matte(infer(x), size) * 255).astype(np.uint8)  # truncation, as the demo does
    return cv2_inter_area(matte8, (h, w))


def pytorch_demo_matte(rgb: np.ndarray, infer: Infer) -> np.ndarray:
    """The 8-bit matte ``demo/image_matting/colab/inference.py`` writes for uint8 RGB ``rgb``."""
    h, w = rgb.shape[:2]
    size = official_size(h, w)
    im = (rgb.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    x = torch_area(im, size).transpose(2, 0, 1)[None].astype(np.float32)
    matte = torch_area(_matte(infer(x), size).astype(np.float32), (h, w))
    return (matte.astype(np.float32) * 255).astype(np.uint8)


# --------------------------------------------------------------------------
# agreement of two 8-bit mattes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How two 8-bit mattes of one photo agree (values in [0, 1] unless said)."""

    iou: float  # of the foregrounds at 0.5 (level >= 128); 1.0 when both are empty
    mae: float
    max_error: float
    pct_over_one_level: float  # % of pixels differing by more than one 8-bit level
    pct_over_two_levels: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def agreement(a: np.ndarray, b: np.ndarray) -> Agreement:
    if a.shape != b.shape:
        raise ValueError(f"mattes of different sizes: {a.shape} and {b.shape}")
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    fa, fb = a >= 128, b >= 128
    union = int(np.count_nonzero(fa | fb))
    iou = float(np.count_nonzero(fa & fb) / union) if union else 1.0
    return Agreement(iou, float(d.mean() / 255.0), float(d.max() / 255.0), float(100.0 * (d > 1).mean()),
                     float(100.0 * (d > 2).mean()))
