"""The foreground's own colour at soft edges: cutouts and composites without background spill.

A pixel on a soft edge (hair, motion blur) is a mix of the subject and what was
behind it: ``I = a F + (1 - a) B``. A cutout that keeps ``I`` under a partial
alpha carries the old background's colour into every new background (a green
or grey fringe). Estimating ``F`` at those pixels and using it instead of ``I``
removes the fringe; this is rembg's ``dc`` ("decontaminate", rembg 2.0.86
``bg.decontaminate_cutout``), which calls the same estimator used here:
pymatting's multi-level ``estimate_foreground_ml`` (Germer et al. 2020) with its
default settings.

Differences from rembg, on purpose: the matte is used at full float precision
(rembg quantises it to 8 bits first), and the estimate is rounded to 8 bits
rather than truncated. Where alpha is 0 the estimate extrapolates the
foreground's colour (invisible in a straight-alpha cutout, and PNG-compresses
better than the original background).

``pymatting`` (with numba) is optional: imported where used, with an install
hint. Its kernels are compiled on first use and cached on disk by numba.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable

import numpy as np

from modnet_npu.errors import ModnetError

INSTALL_HINT = "pip install pymatting (or: pip install -r requirements-bench.txt)"
# modes whose output shows the image's colour: only these change with dc
COLOUR_MODES = ("cutout", "composite")


class ForegroundUnavailable(ModnetError, ImportError):
    """``pymatting`` is not installed."""


@functools.cache  # asked on every dc request; an install does not appear mid-process
def available() -> bool:
    """Whether ``pymatting`` can be imported (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("pymatting") is not None


def require(what: str) -> None:
    """ForegroundUnavailable naming ``what`` and the install, unless pymatting is installed (not imported:
    checked before any work, so that a run does not fail after its model has loaded)."""
    if not available():
        raise ForegroundUnavailable(f"{what} needs pymatting, which is not installed here: {INSTALL_HINT}")


def _estimator() -> Any:
    try:
        from pymatting.foreground.estimate_foreground_ml import estimate_foreground_ml
    except ImportError:
        raise ForegroundUnavailable(f"foreground colour estimation (dc) needs pymatting: {INSTALL_HINT}") from None
    return estimate_foreground_ml


def estimate_foreground(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The foreground colour ``F`` of every pixel, uint8 ``(H, W, 3)``, from the image and its matte.

    ``rgb``: uint8 ``(H, W, 3)`` (an alpha channel, if any, is ignored);
    ``alpha``: float ``(H, W)`` in [0, 1] (clipped). Single-threaded and
    releasing the GIL, so several images can be estimated on a thread pool.
    """
    if rgb.ndim != 3 or rgb.shape[2] < 3 or alpha.shape != rgb.shape[:2]:
        raise ValueError(f"image {rgb.shape} and matte {alpha.shape} do not match")
    estimate = _estimator()
    image = rgb[..., :3].astype(np.float32) * np.float32(1 / 255)
    a = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    foreground = estimate(image, a)
    return np.round(foreground * 255.0).astype(np.uint8)


def decontaminate(mode: str, rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The colours to render ``mode`` with: the estimated foreground for cutouts and composites, else ``rgb``.

    The one call an output path needs: ``render(mode, decontaminate(mode, rgb, alpha), alpha, background)``.
    """
    return colours_by_mode([mode], rgb, alpha, decontaminate=True)[mode]


def colours_by_mode(modes: Iterable[str], rgb: np.ndarray, alpha: np.ndarray, *,
                    decontaminate: bool) -> dict[str, np.ndarray]:
    """The colours to render each of ``modes`` with: with ``decontaminate``, the foreground estimated once
    for every colour mode (cutout, composite); ``rgb`` for the others, and for all without it."""
    modes = list(modes)
    if not decontaminate or not any(mode in COLOUR_MODES for mode in modes):
        return {mode: rgb for mode in modes}
    estimated = estimate_foreground(rgb, alpha)
    return {mode: estimated if mode in COLOUR_MODES else rgb for mode in modes}
