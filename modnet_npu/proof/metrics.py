"""Alpha-matte quality metrics: MSE, MAD, SAD, gradient and connectivity error.

Definitions follow Rhemann et al. 2009, "A Perceptually Motivated Online
Benchmark for Image Matting" (CVPR), and compute what the evaluation code that
matting papers share computes (the MATLAB release of that benchmark and its
Python ports in Deep Image Matting, GCA-Matting, MODNet and others):

* MSE and MAD are means over the pixels (MODNet reports them on PPM-100);
* SAD, gradient and connectivity error are *sums* over the pixels and are
  returned divided by 1000, the unit in which papers print them.

Mattes are float (H, W) arrays in [0, 1]; uint8 (0-255) and uint16 (0-65535)
arrays are scaled, and a trailing single channel (H, W, 1) is dropped. Papers
evaluate either the whole image (MODNet, PPM-100) or only the trimap's unknown
band (Composition-1k): every metric takes an optional boolean ``region`` for the
latter; without it all pixels count.

Pure functions, no globals; scipy is imported only by the two metrics that
need it, so MSE, MAD and SAD work without it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageOps, UnidentifiedImageError

ALPHA_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

# The benchmark's settings (Rhemann et al. 2009, and every port of its code).
GRADIENT_SIGMA = 1.4
CONNECTIVITY_STEP = 0.1
CONNECTIVITY_THETA = 0.15

# The Gaussian-derivative filter is cut where the Gaussian falls below this
# fraction of its peak, as in the reference `gaussgradient`; with sigma 1.4 the
# filter is 9x9.
_FILTER_EPSILON = 1e-2


class MattingMetricsError(ValueError):
    """Inputs the metrics cannot score: mismatched shapes, bad values, unreadable files."""


@dataclass(frozen=True)
class MattingScores:
    """The five metrics of one predicted matte against its ground truth.

    ``mse`` and ``mad`` are per-pixel means (unscaled); ``sad``, ``grad`` and
    ``conn`` are per-image sums divided by 1000, as papers report them.
    """

    mse: float
    mad: float
    sad: float
    grad: float
    conn: float


# --------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------


def _as_alpha(a: ArrayLike, name: str) -> np.ndarray:
    """One matte as float64 (H, W) in [0, 1], or MattingMetricsError saying what is wrong."""
    arr = np.asarray(a)
    shape = arr.shape
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise MattingMetricsError(f"{name}: expected an (H, W) or (H, W, 1) alpha matte, got shape {shape}")
    if arr.dtype == np.uint8:
        out = arr / 255.0
    elif arr.dtype == np.uint16:
        out = arr / 65535.0
    elif arr.dtype.kind == "f":
        out = arr.astype(np.float64)
    else:
        raise MattingMetricsError(f"{name}: dtype {arr.dtype} is not an alpha matte (expected uint8, uint16 or float)")
    return _check_range(out, name)


def _check_range(out: np.ndarray, name: str) -> np.ndarray:
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise MattingMetricsError(f"{name}: {bad} NaN or infinite value(s)")
    lo, hi = float(out.min()), float(out.max())
    # A float matte in 0-255 would score nonsense silently, so it is refused, not clipped.
    if lo < 0.0 or hi > 1.0:
        raise MattingMetricsError(f"{name}: values span [{lo:g}, {hi:g}], outside [0, 1]")
    return out


def _prepare(
    pred: ArrayLike, gt: ArrayLike, region: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    p = _as_alpha(pred, "pred")
    g = _as_alpha(gt, "gt")
    if p.shape != g.shape:
        raise MattingMetricsError(f"pred has shape {np.shape(pred)} but gt has shape {np.shape(gt)}")
    if region is None:
        return p, g, None
    m = np.asarray(region)
    # Only bool is accepted: a uint8 trimap passed as-is would select every
    # non-zero pixel, not the unknown band (trimap == 128) that was meant.
    if m.dtype != np.bool_:
        raise MattingMetricsError(f"region: expected a boolean mask, got dtype {m.dtype}")
    if m.shape != p.shape:
        raise MattingMetricsError(f"region has shape {m.shape} but the mattes have shape {p.shape}")
    if not m.any():
        raise MattingMetricsError("region selects no pixels")
    return p, g, m


def _pick(error_map: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    return error_map.ravel() if region is None else error_map[region]


# --------------------------------------------------------------------------
# the metrics (private forms take checked float64 arrays)
# --------------------------------------------------------------------------


def _mse(p: np.ndarray, g: np.ndarray, region: np.ndarray | None) -> float:
    return float(np.mean(_pick((p - g) ** 2, region)))


def _mad(p: np.ndarray, g: np.ndarray, region: np.ndarray | None) -> float:
    return float(np.mean(_pick(np.abs(p - g), region)))


def _sad(p: np.ndarray, g: np.ndarray, region: np.ndarray | None) -> float:
    return float(np.sum(_pick(np.abs(p - g), region))) / 1000.0


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-(x**2) / (2.0 * sigma**2)) / (sigma * np.sqrt(2.0 * np.pi))


def _gaussian_derivative_filter(sigma: float = GRADIENT_SIGMA) -> np.ndarray:
    """The x-derivative-of-Gaussian filter of the reference code (y is its transpose).

    ``h[i, j] = G(i - r) * G'(j - r)``, cut at radius ``r`` where the Gaussian
    drops below 1 % and scaled to unit L2 norm (not unit gain): that
    normalisation is part of the metric's definition, so gradient errors are
    only comparable with papers' when it is kept.
    """
    if not (np.isfinite(sigma) and sigma > 0):
        raise MattingMetricsError(f"sigma must be a positive number, got {sigma!r}")
    peak = np.sqrt(2.0 * np.pi) * sigma * _FILTER_EPSILON
    if peak >= 1.0:  # the cut-off radius formula needs log(peak) < 0
        raise MattingMetricsError(f"sigma {sigma:g} is too large for the reference filter (must be < 39.9)")
    radius = int(np.ceil(sigma * np.sqrt(-2.0 * np.log(peak))))
    u = np.arange(-radius, radius + 1, dtype=np.float64)
    h = _gauss(u, sigma)[:, None] * (-u * _gauss(u, sigma) / sigma**2)[None, :]
    norm = float(np.sqrt(np.sum(h**2)))
    if not norm > 0:  # a tiny sigma underflows the off-centre taps to zero
        raise MattingMetricsError(f"sigma {sigma:g} is too small for the reference filter")
    return h / norm


def _gradient_magnitude(a: np.ndarray, h: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    # 'nearest' is the reference's border rule (MATLAB imfilter 'replicate');
    # zero padding would invent an edge along every border of a white matte.
    gx = ndimage.convolve(a, h, mode="nearest")
    gy = ndimage.convolve(a, h.T, mode="nearest")
    return np.sqrt(gx**2 + gy**2)


def _grad(p: np.ndarray, g: np.ndarray, region: np.ndarray | None, sigma: float) -> float:
    h = _gaussian_derivative_filter(sigma)
    error_map = (_gradient_magnitude(p, h) - _gradient_magnitude(g, h)) ** 2
    return float(np.sum(_pick(error_map, region))) / 1000.0


def _threshold_levels(step: float) -> np.ndarray:
    if not (np.isfinite(step) and 0 < step <= 1):
        raise MattingMetricsError(f"step must be in (0, 1], got {step!r}")
    n = round(1.0 / step)
    if abs(n * step - 1.0) > 1e-9:
        raise MattingMetricsError(f"step must divide 1 into equal parts (0.1, 0.05, ...), got {step!r}")
    # i / n is the correctly rounded level (3 / 10 == 0.3); the reference's
    # arange(0, 1 + step, step) yields 0.30000000000000004, which would drop
    # pixels whose alpha is exactly 0.3 one level early.
    return np.arange(n + 1) / n


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)  # the default structure is 4-connectivity
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    # Label 0 is the background and must not compete: counting it is a known
    # bug of some Python ports, which then call the background "connected".
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1  # ties: first in raster order


def _conn(p: np.ndarray, g: np.ndarray, region: np.ndarray | None, step: float, theta: float) -> float:
    if not np.isfinite(theta):
        raise MattingMetricsError(f"theta must be a finite number, got {theta!r}")
    levels = _threshold_levels(step)
    # lost[i]: the last level at which pixel i still belonged to the largest
    # 4-connected region where both mattes reach the level (-1: not lost yet).
    lost = np.full(p.shape, -1.0)
    for k in range(1, len(levels)):
        omega = _largest_component((p >= levels[k]) & (g >= levels[k]))
        lost[(lost == -1.0) & ~omega] = levels[k - 1]
    lost[lost == -1.0] = 1.0
    d_pred = p - lost
    d_gt = g - lost
    # Differences below theta are not perceived as disconnections: phi = 1 there.
    phi_pred = 1.0 - d_pred * (d_pred >= theta)
    phi_gt = 1.0 - d_gt * (d_gt >= theta)
    return float(np.sum(_pick(np.abs(phi_pred - phi_gt), region))) / 1000.0


# --------------------------------------------------------------------------
# public metrics
# --------------------------------------------------------------------------


def mse(pred: ArrayLike, gt: ArrayLike, *, region: ArrayLike | None = None) -> float:
    """Mean squared error over the pixels (unscaled)."""
    return _mse(*_prepare(pred, gt, region))


def mad(pred: ArrayLike, gt: ArrayLike, *, region: ArrayLike | None = None) -> float:
    """Mean absolute difference over the pixels (unscaled)."""
    return _mad(*_prepare(pred, gt, region))


def sad(pred: ArrayLike, gt: ArrayLike, *, region: ArrayLike | None = None) -> float:
    """Sum of absolute differences, divided by 1000."""
    return _sad(*_prepare(pred, gt, region))


def gradient_error(
    pred: ArrayLike, gt: ArrayLike, *, sigma: float = GRADIENT_SIGMA, region: ArrayLike | None = None
) -> float:
    """Sum of (|grad pred| - |grad gt|)^2 with Gaussian-derivative gradients, divided by 1000."""
    return _grad(*_prepare(pred, gt, region), sigma)


def connectivity_error(
    pred: ArrayLike,
    gt: ArrayLike,
    *,
    step: float = CONNECTIVITY_STEP,
    theta: float = CONNECTIVITY_THETA,
    region: ArrayLike | None = None,
) -> float:
    """Sum of |phi(pred) - phi(gt)| (Rhemann et al. 2009, eq. 4), divided by 1000.

    ``phi = 1 - d * (d >= theta)`` with ``d = alpha - l`` and ``l`` the
    threshold level (in steps of ``step``) at which the pixel leaves the
    largest 4-connected region where both mattes reach the level.
    """
    return _conn(*_prepare(pred, gt, region), step, theta)


def score(pred: ArrayLike, gt: ArrayLike, *, region: ArrayLike | None = None) -> MattingScores:
    """All five metrics with the benchmark's settings; see MattingScores for units."""
    p, g, m = _prepare(pred, gt, region)
    return MattingScores(
        mse=_mse(p, g, m),
        mad=_mad(p, g, m),
        sad=_sad(p, g, m),
        grad=_grad(p, g, m, GRADIENT_SIGMA),
        conn=_conn(p, g, m, CONNECTIVITY_STEP, CONNECTIVITY_THETA),
    )


# --------------------------------------------------------------------------
# ground-truth files
# --------------------------------------------------------------------------


def _scaled_wide(img: Image.Image, what: str) -> np.ndarray:
    """16-bit, 32-bit integer and float images to [0, 1] floats."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "I":
        # Older Pillow opens 16-bit PNGs as "I" with no depth recorded; a
        # maximum above 255 can only come from a 16-bit file.
        top = 65535.0 if arr.size and arr.max() > 255 else 255.0
    else:  # "F": float TIFFs hold [0, 1] or 0-255
        top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
    return _check_range(arr / top, what)


def _alpha_from_image(img: Image.Image, what: str) -> np.ndarray:
    if img.mode.startswith("I") or img.mode == "F":
        return _scaled_wide(img, what)
    if img.mode == "P":
        img = img.convert("RGBA")  # a palette may carry transparency
    if "A" in img.getbands():
        alpha = np.asarray(img.getchannel("A"))
        # An all-opaque alpha carries no matte: the matte is then the pixels.
        if (alpha != 255).any():
            return alpha / 255.0
    return np.asarray(img.convert("L")) / 255.0


def load_alpha(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a ground-truth alpha file into float64 (H, W) in [0, 1].

    8- and 16-bit grayscale, palette, RGB (luminance) and RGBA/LA images (their
    alpha channel unless it is fully opaque, then luminance). EXIF orientation
    is applied, as imaging.load_image does to the photo, so the two line up.
    Raises MattingMetricsError with one line naming the file.
    """
    what = os.fspath(path)
    try:
        with Image.open(what) as img:
            img.load()
            return _alpha_from_image(ImageOps.exif_transpose(img) or img, what)
    except MattingMetricsError:
        raise
    except FileNotFoundError:
        raise MattingMetricsError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise MattingMetricsError(f"{what}: is a folder") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MattingMetricsError(f"{what}: not a readable alpha matte ({reason})") from None


def _alphas_by_stem(folder: Path) -> dict[str, list[Path]]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise MattingMetricsError(f"{folder}: cannot list the ground-truth folder ({exc.strerror})") from None
    by_stem: dict[str, list[Path]] = {}
    for entry in entries:
        # Stems match case-sensitively (dataset names differ only by case at
        # times); extensions are matched in any case (.PNG, .Jpg).
        if entry.suffix.lower() in ALPHA_EXTENSIONS and entry.is_file():
            by_stem.setdefault(entry.stem, []).append(entry)
    return by_stem


def match_alphas(
    image_paths: Iterable[str | os.PathLike[str]], alphas_dir: str | os.PathLike[str]
) -> dict[Any, Path]:
    """Map each image path (the key, as given) to the alpha in ``alphas_dir`` with its stem.

    Any extension of ALPHA_EXTENSIONS counts. Raises MattingMetricsError naming
    the first image with no ground truth, or with several (a.png and a.jpg),
    since picking one silently could score against the wrong file.
    """
    if isinstance(image_paths, (str, bytes, os.PathLike)):
        raise TypeError("image_paths must be a collection of paths, not a single path")
    folder = Path(alphas_dir)
    if not folder.is_dir():
        raise MattingMetricsError(f"{folder}: not a folder of ground-truth alphas")
    by_stem = _alphas_by_stem(folder)
    matches: dict[Any, Path] = {}
    for image in image_paths:
        stem = Path(image).stem
        found = by_stem.get(stem, [])
        if not found:
            raise MattingMetricsError(f"{os.fspath(image)}: no ground-truth alpha named {stem}.* in {folder}")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise MattingMetricsError(f"{os.fspath(image)}: several ground-truth alphas in {folder} ({names})")
        matches[image] = found[0]
    return matches
