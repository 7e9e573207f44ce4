"""Matting metrics against hand-computed values on tiny mattes, and against a
line-by-line port of the benchmark's reference evaluation code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from modnet_npu.proof import metrics as mm
from modnet_npu.proof.metrics import MattingMetricsError, MattingScores

# --------------------------------------------------------------------------
# MSE, MAD, SAD by hand
# --------------------------------------------------------------------------


def test_mse_mad_sad_on_2x2_by_hand():
    pred = np.array([[0.0, 0.5], [1.0, 1.0]])
    gt = np.array([[0.0, 1.0], [0.5, 1.0]])
    # |pred - gt| = [0, .5, .5, 0]
    # MSE = (0 + .25 + .25 + 0) / 4 = 0.125; MAD = 1.0 / 4 = 0.25; SAD = 1.0 / 1000
    assert mm.mse(pred, gt) == 0.125
    assert mm.mad(pred, gt) == 0.25
    assert mm.sad(pred, gt) == pytest.approx(0.001, abs=1e-15)


def test_mse_mad_sad_on_3x3_by_hand():
    pred = np.full((3, 3), 0.25)
    gt = np.eye(3)
    # diagonal: |.25 - 1| = .75 (3 px); elsewhere |.25 - 0| = .25 (6 px)
    # sum |d| = 2.25 + 1.5 = 3.75; sum d^2 = 3 * .5625 + 6 * .0625 = 2.0625
    assert mm.mad(pred, gt) == pytest.approx(3.75 / 9)
    assert mm.mse(pred, gt) == pytest.approx(2.0625 / 9)
    assert mm.sad(pred, gt) == pytest.approx(3.75 / 1000)


def test_region_restricts_every_metric_to_its_pixels():
    pred = np.full((3, 3), 0.25)
    gt = np.eye(3)
    region = np.zeros((3, 3), dtype=bool)
    region[0, :] = True  # pixels: |.25 - 1|, |.25 - 0|, |.25 - 0| = .75, .25, .25
    assert mm.mad(pred, gt, region=region) == pytest.approx(1.25 / 3)
    assert mm.mse(pred, gt, region=region) == pytest.approx((0.5625 + 0.0625 * 2) / 3)
    assert mm.sad(pred, gt, region=region) == pytest.approx(1.25 / 1000)


# --------------------------------------------------------------------------
# the whole score
# --------------------------------------------------------------------------


def test_a_perfect_matte_scores_exactly_zero_on_all_five():
    gt = np.random.default_rng(1).uniform(0, 1, (16, 20))
    assert mm.score(gt, gt.copy()) == MattingScores(0.0, 0.0, 0.0, 0.0, 0.0)


def test_score_is_the_individual_metrics():
    rng = np.random.default_rng(2)
    pred, gt = rng.uniform(0, 1, (2, 12, 14))
    s = mm.score(pred, gt)
    assert s.mse == mm.mse(pred, gt)
    assert s.mad == mm.mad(pred, gt)
    assert s.sad == mm.sad(pred, gt)
    assert s.grad == mm.gradient_error(pred, gt)
    assert s.conn == mm.connectivity_error(pred, gt)


def test_every_metric_is_symmetric():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 1, (2, 15, 17))
    assert mm.score(a, b) == mm.score(b, a)


def test_scores_are_frozen():
    s = MattingScores(1.0, 2.0, 3.0, 4.0, 5.0)
    with pytest.raises(AttributeError):
        s.mse = 0.0  # type: ignore[misc]


# --------------------------------------------------------------------------
# gradient error
# --------------------------------------------------------------------------


def test_gradient_filter_is_the_reference_one():
    h = mm._gaussian_derivative_filter(1.4)
    # radius = ceil(1.4 * sqrt(-2 ln(sqrt(2 pi) * 1.4 * 0.01))) = ceil(3.62) = 4
    assert h.shape == (9, 9)
    assert np.sum(h**2) == pytest.approx(1.0)  # unit L2 norm, not unit gain
    np.testing.assert_allclose(h, -h[:, ::-1])  # odd along x (a derivative)
    np.testing.assert_allclose(h, h[::-1, :])  # even along y (a smoothing)
    assert np.all(h[:, 4] == 0)
    assert h[4, 3] > 0  # -x * G(x) is positive left of the centre


def test_gradient_error_of_flat_mattes_is_zero_even_when_they_differ():
    # With replicated borders a constant image has no gradient anywhere (the
    # filter's taps sum to 0), so (|0| - |0|)^2 = 0 at every pixel although
    # MAD = .4; only rounding of the tap sum is left (~1e-34).
    pred = np.full((6, 6), 0.3)
    gt = np.full((6, 6), 0.7)
    assert mm.gradient_error(pred, gt) == pytest.approx(0.0, abs=1e-20)
    assert mm.mad(pred, gt) == pytest.approx(0.4)


def test_gradient_error_is_zero_for_equal_mattes_and_positive_for_a_shifted_edge():
    gt = np.zeros((10, 10))
    gt[:, :5] = 1.0
    shifted = np.zeros((10, 10))
    shifted[:, :6] = 1.0
    assert mm.gradient_error(gt, gt.copy()) == 0.0
    assert mm.gradient_error(shifted, gt) > 0.0
    assert mm.gradient_error(shifted, gt) == mm.gradient_error(gt, shifted)


def test_gradient_error_scales_with_the_square_of_the_contrast():
    # Against a flat gt the error is sum |grad pred|^2, and the gradient is
    # linear in pred: halving pred's contrast quarters the error.
    edge = np.zeros((10, 10))
    edge[:, :5] = 1.0
    flat = np.zeros((10, 10))
    assert mm.gradient_error(0.5 * edge, flat) == pytest.approx(mm.gradient_error(edge, flat) / 4)


def test_bad_sigma_is_refused():
    a = np.zeros((4, 4))
    for sigma in (0.0, -1.0, float("nan"), 50.0):
        with pytest.raises(MattingMetricsError, match="sigma"):
            mm.gradient_error(a, a, sigma=sigma)


# --------------------------------------------------------------------------
# connectivity error
# --------------------------------------------------------------------------


def test_connectivity_of_a_disconnected_blob_by_hand():
    gt = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0.1]])
    pred = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0.3]])
    # Level 0.1: both >= 0.1 on the 2x2 block and at (2, 2); (2, 2) touches the
    # block only diagonally, so with 4-connectivity the largest component is
    # the block and (2, 2) is lost at l = 0 (so are the zeros: d = 0, phi = 1).
    # The block stays connected through level 1.0: l = 1, d = 0, phi = 1.
    # At (2, 2): d_pred = .3 >= .15 -> phi = .7; d_gt = .1 < .15 -> phi = 1.
    # error = |.7 - 1| = .3, reported / 1000.
    assert mm.connectivity_error(pred, gt) == pytest.approx(0.3 / 1000)


def test_connectivity_of_the_same_blob_when_connected_by_hand():
    gt = np.array([[1, 1, 0], [1, 1, 0.1], [0, 0, 0]])
    pred = np.array([[1, 1, 0], [1, 1, 0.3], [0, 0, 0]])
    # (1, 2) is 4-adjacent to the block: connected at level 0.1, lost at 0.2
    # (gt = .1 < .2), so l = 0.1. d_pred = .2 -> phi = .8; d_gt = 0 -> phi = 1.
    # error = .2 / 1000 (an 8-connected labelling would give this for the
    # diagonal blob above too).
    assert mm.connectivity_error(pred, gt) == pytest.approx(0.2 / 1000)


def test_connectivity_background_never_counts_as_the_largest_component():
    pred = np.zeros((3, 3))
    gt = np.zeros((3, 3))
    pred[1, 1] = 1.0
    gt[1, 1] = 0.1
    # The centre alone is the largest component at 0.1 and is gone at 0.2:
    # l = .1, d_pred = .9 -> phi = .1, d_gt = 0 -> phi = 1: error .9.
    # (A port that lets label 0, the background, win gets l = 0 and 1.0.)
    assert mm.connectivity_error(pred, gt) == pytest.approx(0.9 / 1000)


def test_connectivity_is_symmetric_and_respects_region():
    gt = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0.1]])
    pred = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0.3]])
    assert mm.connectivity_error(gt, pred) == mm.connectivity_error(pred, gt)
    region = np.ones((3, 3), dtype=bool)
    region[2, 2] = False  # leave out the only pixel that differs
    assert mm.connectivity_error(pred, gt, region=region) == 0.0


def test_connectivity_levels_are_exact_tenths():
    # alpha = .3 must pass level 3/10: with arange's 0.30000000000000004 the
    # pixel would be lost one level early (l = .2 instead of .3).
    np.testing.assert_array_equal(mm._threshold_levels(0.1), [k / 10 for k in range(11)])
    assert mm._threshold_levels(0.1)[3] == 0.3


def test_bad_connectivity_options_are_refused():
    a = np.zeros((4, 4))
    for step in (0.0, -0.1, 0.3, 2.0):
        with pytest.raises(MattingMetricsError, match="step"):
            mm.connectivity_error(a, a, step=step)
    with pytest.raises(MattingMetricsError, match="theta"):
        mm.connectivity_error(a, a, theta=float("nan"))


# --------------------------------------------------------------------------
# against a port of the reference evaluation code
# --------------------------------------------------------------------------


def _ref_gradient(pred, target, sigma=1.4):
    # The loops of the reference `gaussgradient` / `compute_gradient_loss`.
    def gauss(x):
        return np.exp(-(x**2) / (2 * sigma**2)) / (sigma * np.sqrt(2 * np.pi))

    def dgauss(x):
        return -x * gauss(x) / sigma**2

    half = int(np.ceil(sigma * np.sqrt(-2 * np.log(np.sqrt(2 * np.pi) * sigma * 1e-2))))
    size = 2 * half + 1
    hx = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            hx[i, j] = gauss(i - half) * dgauss(j - half)
    hx = hx / np.sqrt(np.sum(np.abs(hx) * np.abs(hx)))
    hy = hx.transpose()

    def amp(im):
        gx = ndimage.convolve(im, hx, mode="nearest")
        gy = ndimage.convolve(im, hy, mode="nearest")
        return np.sqrt(gx**2 + gy**2)

    return np.sum((amp(pred) - amp(target)) ** 2) / 1000.0


def _ref_connectivity(pred, target, step=0.1):
    # The reference `compute_connectivity_error`, with the largest component
    # taken among the foreground labels only.
    thresh_steps = [k / round(1 / step) for k in range(round(1 / step) + 1)]
    l_map = np.ones_like(pred) * -1
    for i in range(1, len(thresh_steps)):
        both = (pred >= thresh_steps[i]).astype(int) * (target >= thresh_steps[i]).astype(int)
        labels, n = ndimage.label(both)
        omega = np.zeros_like(both)
        if n:
            omega = (labels == np.argmax(np.bincount(labels.flat)[1:]) + 1).astype(int)
        flag = ((l_map == -1) & (omega == 0)).astype(int)
        l_map[flag == 1] = thresh_steps[i - 1]
    l_map[l_map == -1] = 1
    pred_d = pred - l_map
    target_d = target - l_map
    pred_phi = 1 - pred_d * (pred_d >= 0.15).astype(int)
    target_phi = 1 - target_d * (target_d >= 0.15).astype(int)
    return np.sum(np.abs(pred_phi - target_phi)) / 1000.0


def _blobby_pair(seed):
    # Smoothed noise: mattes with several blobs, edges and plateaus.
    rng = np.random.default_rng(seed)
    gt = np.clip(ndimage.gaussian_filter(rng.normal(0.5, 1, (40, 48)), 2) * 3 + 0.5, 0, 1)
    pred = np.clip(gt + ndimage.gaussian_filter(rng.normal(0, 0.6, gt.shape), 1.5), 0, 1)
    return pred, gt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_and_connectivity_match_the_reference_code(seed):
    pred, gt = _blobby_pair(seed)
    assert mm.gradient_error(pred, gt) == pytest.approx(_ref_gradient(pred, gt), rel=1e-12)
    assert mm.connectivity_error(pred, gt) == pytest.approx(_ref_connectivity(pred, gt), rel=1e-12)
    assert mm.connectivity_error(pred, gt) > 0


# --------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes_on_one_line():
    with pytest.raises(MattingMetricsError) as info:
        mm.score(np.zeros((3, 3)), np.zeros((4, 4)))
    message = str(info.value)
    assert "(3, 3)" in message and "(4, 4)" in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_uint8_is_divided_by_255_and_single_channel_is_squeezed():
    pred = np.array([[0, 255], [51, 255]], dtype=np.uint8)  # 0, 1, .2, 1
    gt = np.array([[0.0, 1.0], [0.2, 1.0]])
    assert mm.score(pred, gt) == MattingScores(0.0, 0.0, 0.0, 0.0, 0.0)
    half = np.array([[0, 255]], dtype=np.uint8)
    assert mm.mad(half, np.zeros((1, 2))) == 0.5
    assert mm.mad(half[..., None], np.zeros((1, 2, 1))) == 0.5
    assert mm.mad(np.array([[65535]], dtype=np.uint16), np.zeros((1, 1))) == 1.0


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0.0, np.inf]]), "infinite"),
        (np.array([[0.0, 255.0]]), "outside [0, 1]"),
        (np.array([[-0.1, 0.5]]), "outside [0, 1]"),
        (np.array([[0, 1]], dtype=np.int64), "dtype int64"),
        (np.zeros((1, 2, 3)), "shape (1, 2, 3)"),
    ],
)
def test_bad_values_are_refused_naming_the_argument(bad, words):
    with pytest.raises(MattingMetricsError) as info:
        mm.mse(bad, np.zeros(bad.shape[:2]))
    assert str(info.value).startswith("pred:")
    assert words in str(info.value)


def test_region_must_be_a_boolean_mask_of_the_same_shape_selecting_something():
    a = np.zeros((2, 2))
    with pytest.raises(MattingMetricsError, match="boolean"):
        mm.mse(a, a, region=np.full((2, 2), 128, dtype=np.uint8))
    with pytest.raises(MattingMetricsError, match="shape"):
        mm.mse(a, a, region=np.ones((3, 3), dtype=bool))
    with pytest.raises(MattingMetricsError, match="no pixels"):
        mm.mse(a, a, region=np.zeros((2, 2), dtype=bool))


# --------------------------------------------------------------------------
# load_alpha
# --------------------------------------------------------------------------


def test_load_alpha_reads_a_16_bit_png_at_full_depth(tmp_path: Path):
    raw = np.array([[0, 65535], [32768, 1]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "a.png")
    alpha = mm.load_alpha(tmp_path / "a.png")
    assert alpha.dtype == np.float64 and alpha.shape == (2, 2)
    np.testing.assert_array_equal(alpha, raw / 65535.0)  # 1/65535 survives: not cut to 8 bits


def test_load_alpha_reads_8_bit_grayscale_and_rgb(tmp_path: Path):
    raw = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    Image.fromarray(raw).save(tmp_path / "g.png")
    Image.fromarray(np.repeat(raw[..., None], 3, axis=2)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(mm.load_alpha(tmp_path / "g.png"), raw / 255.0)
    np.testing.assert_array_equal(mm.load_alpha(str(tmp_path / "rgb.png")), raw / 255.0)


def test_load_alpha_of_rgba_uses_alpha_unless_it_is_opaque(tmp_path: Path):
    gray = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    rgba = np.stack([gray, gray, gray, np.array([[0, 255], [128, 255]], dtype=np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "matte.png")
    np.testing.assert_array_equal(mm.load_alpha(tmp_path / "matte.png"), rgba[..., 3] / 255.0)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(mm.load_alpha(tmp_path / "opaque.png"), gray / 255.0)


def test_load_alpha_of_a_missing_file_names_it(tmp_path: Path):
    missing = tmp_path / "nope.png"
    with pytest.raises(MattingMetricsError) as info:
        mm.load_alpha(missing)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_load_alpha_of_a_broken_file_names_it(tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png\nat all")
    with pytest.raises(MattingMetricsError) as info:
        mm.load_alpha(broken)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------
# match_alphas
# --------------------------------------------------------------------------


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_match_alphas_pairs_by_stem_with_any_alpha_extension(tmp_path: Path):
    alphas = tmp_path / "matte"
    _touch(alphas, "a.png", "b.JPG", "c.tiff", "notes.txt")
    images = ["img/a.jpg", Path("img/b.png"), "other/c.webp"]
    assert mm.match_alphas(images, alphas) == {
        "img/a.jpg": alphas / "a.png",
        Path("img/b.png"): alphas / "b.JPG",
        "other/c.webp": alphas / "c.tiff",
    }


def test_match_alphas_names_the_first_image_without_ground_truth(tmp_path: Path):
    alphas = tmp_path / "matte"
    _touch(alphas, "a.png", "B.png", "notes.txt")
    with pytest.raises(MattingMetricsError) as info:
        mm.match_alphas(["x/a.jpg", "x/b.jpg", "x/notes.jpg"], alphas)  # stems are case-sensitive
    assert str(info.value).startswith("x/b.jpg:")


def test_match_alphas_refuses_ambiguous_ground_truth_and_missing_folders(tmp_path: Path):
    _touch(tmp_path / "matte", "a.png", "a.jpg")
    with pytest.raises(MattingMetricsError, match="several"):
        mm.match_alphas(["a.jpg"], tmp_path / "matte")
    with pytest.raises(MattingMetricsError, match="not a folder"):
        mm.match_alphas(["a.jpg"], tmp_path / "absent")
    with pytest.raises(TypeError):
        mm.match_alphas("a.jpg", tmp_path / "matte")  # type: ignore[arg-type]
