"""Foreground colour estimation (rembg's dc): background spill removed at soft edges, measured."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from modnet_npu.matting import foreground as fg
from modnet_npu.matting.imaging import composite, cutout

needs_pymatting = pytest.mark.skipif(not fg.available(), reason="pymatting not installed: " + fg.INSTALL_HINT)


def _scene(h: int = 96, w: int = 128):
    """A known foreground (skin-like, shaded) blended over a known green background through a soft band."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fore = np.stack([0.85 - 0.2 * yy / h, 0.6 + 0.1 * xx / w, 0.45 + 0.0 * xx], axis=2)
    rng = np.random.default_rng(0)
    back = np.stack([0.1 + 0.05 * rng.random((h, w)), 0.75 + 0.1 * np.sin(xx / 5), 0.2 + 0.0 * xx], axis=2)
    # alpha: 1 on the left, 0 on the right, a soft band of a quarter of the width between (like hair)
    alpha = np.clip((0.65 * w - xx) / (0.25 * w), 0, 1) * (0.8 + 0.2 * np.cos(yy / 3)) ** (xx > 0.4 * w)
    alpha = np.clip(alpha, 0, 1).astype(np.float32)
    image = alpha[..., None] * fore + (1 - alpha[..., None]) * back
    to8 = lambda a: np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    return to8(image), alpha, to8(fore), to8(back)


@needs_pymatting
def test_estimated_foreground_is_closer_to_the_truth_than_the_raw_image():
    image, alpha, fore, _ = _scene()
    soft = (alpha > 0.05) & (alpha < 0.95)
    assert soft.sum() > 1000  # the band the test is about
    est = fg.estimate_foreground(image, alpha)
    assert est.shape == image.shape and est.dtype == np.uint8
    raw_err = np.abs(image.astype(float) - fore)[soft].mean()
    est_err = np.abs(est.astype(float) - fore)[soft].mean()
    # the raw image carries the green background in the band; the estimate must remove most of it
    assert raw_err > 20, raw_err
    assert est_err < 0.2 * raw_err, (est_err, raw_err)
    # and it leaves the solid foreground alone (within 8-bit rounding and a few levels of smoothing)
    solid = alpha > 0.999
    assert np.abs(est.astype(float) - image)[solid].mean() < 2.0


@needs_pymatting
def test_composites_over_a_new_background_carry_no_spill():
    image, alpha, fore, _ = _scene()
    white = np.full_like(image, 255)
    truth = composite(fore, alpha, white).astype(float)
    plain = composite(image, alpha, white).astype(float)
    clean = composite(fg.decontaminate("composite", image, alpha), alpha, white).astype(float)
    soft = (alpha > 0.05) & (alpha < 0.95)
    assert np.abs(clean - truth)[soft].mean() < 0.2 * np.abs(plain - truth)[soft].mean()
    # the green cast itself: the plain composite's green excess over red in the band shrinks
    green_excess = lambda c: (c[..., 1] - truth[..., 1])[soft].mean()  # noqa: E731
    assert green_excess(clean) < 0.35 * green_excess(plain)


@needs_pymatting
def test_only_colour_modes_change_and_cutouts_keep_the_matte():
    image, alpha, _, _ = _scene(48, 64)
    assert fg.decontaminate("matte", image, alpha) is image
    out = cutout(fg.decontaminate("cutout", image, alpha), alpha)
    assert out.shape == (48, 64, 4)
    assert np.array_equal(out[..., 3], cutout(image, alpha)[..., 3])


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        fg.estimate_foreground(np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4), np.float32))


def test_missing_pymatting_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymatting", None)
    monkeypatch.setitem(sys.modules, "pymatting.foreground", None)
    monkeypatch.setitem(sys.modules, "pymatting.foreground.estimate_foreground_ml", None)
    with pytest.raises(fg.ForegroundUnavailable, match="pip install pymatting"):
        fg.estimate_foreground(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32))


def test_colours_by_mode_estimates_once_for_the_colour_modes_only(monkeypatch):
    image, alpha, _, _ = _scene(8, 8)
    calls = []
    monkeypatch.setattr(fg, "estimate_foreground", lambda rgb, a: calls.append(1) or np.zeros_like(rgb))
    both = fg.colours_by_mode(["matte", "cutout", "composite"], image, alpha, decontaminate=True)
    assert len(calls) == 1 and both["matte"] is image and not both["cutout"].any() and both["composite"] is both["cutout"]
    assert fg.colours_by_mode(["matte"], image, alpha, decontaminate=True) == {"matte": image} and len(calls) == 1
    assert fg.colours_by_mode(["cutout"], image, alpha, decontaminate=False)["cutout"] is image and len(calls) == 1


def test_require_names_what_needs_pymatting(monkeypatch):
    monkeypatch.setattr(fg, "available", lambda: False)
    with pytest.raises(fg.ForegroundUnavailable, match="^--decontaminate needs pymatting.*pip install pymatting"):
        fg.require("--decontaminate")
    monkeypatch.setattr(fg, "available", lambda: True)
    fg.require("--decontaminate")  # nothing to say
