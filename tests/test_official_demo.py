"""MODNet's official demos re-implemented (bench/official_demo.py) and the area filter the project
resamples with since (matting/area.py): checked against values OpenCV and PyTorch compute.

The OpenCV vectors below were computed with opencv-python-headless 5.0.0.93
(``cv2.resize(..., interpolation=cv2.INTER_AREA)``); OpenCV is not a dependency.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modnet_npu.bench import official_demo as od
from modnet_npu.matting import imaging as im
from modnet_npu.matting.area import resize_area

RAMP7 = np.array([[0, 10, 20, 30, 40, 50, 60]], np.float64)
STEP3 = np.array([[0, 100, 200]], np.float64)
# cv2.resize(RAMP7 / STEP3 / M8, (w, h), interpolation=cv2.INTER_AREA), OpenCV 5.0.0
CV2 = {
    "7->3": [7.1428573132, 30.0000008941, 52.8571435809],
    "7->4": [4.2857143283, 21.4285723865, 38.5714302957, 55.7142874599],
    "3->7": [0.0, 0.0, 66.6666686535, 100.0, 133.3333313465, 200.0, 200.0],
    "3->8": [0.0, 0.0, 33.3333343267, 100.0, 100.0, 166.6666686535, 200.0, 200.0],
}
M8 = np.array([[0, 100, 200], [50, 150, 250]], np.uint8)
CV2_M8_5x7 = [[0, 0, 67, 100, 133, 200, 200], [0, 0, 67, 100, 133, 200, 200], [25, 25, 92, 125, 158, 225, 225],
              [50, 50, 117, 150, 183, 250, 250], [50, 50, 117, 150, 183, 250, 250]]


@pytest.mark.parametrize("key, src, size", [("7->3", RAMP7, (1, 3)), ("7->4", RAMP7, (1, 4)),
                                            ("3->7", STEP3, (1, 7)), ("3->8", STEP3, (1, 8))])
def test_area_filter_is_opencvs(key, src, size):
    assert np.allclose(resize_area(src, size)[0], CV2[key], atol=1e-4)


def test_the_demos_8_bit_growth_is_opencvs_fixed_point():
    assert od.cv2_inter_area(M8, (5, 7)).tolist() == CV2_M8_5x7


def test_area_filter_on_8_bit_rgb_rounds_and_keeps_the_size_rule():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, 1::2] = 255
    small = resize_area(rgb, (2, 3))  # an exact 2x2 block mean: 127.5 rounds to even
    assert small.dtype == np.uint8 and small.shape == (2, 3, 3) and np.all(small == 128)
    same = resize_area(rgb, (4, 6))
    assert same is not rgb and np.array_equal(same, rgb)
    grown = resize_area(np.array([[0, 255]], np.uint8), (2, 4))  # an integer factor grows by replication
    assert grown.tolist() == [[0, 0, 255, 255], [0, 0, 255, 255]]


@pytest.mark.parametrize("src, dst", [((37, 53), (16, 20)), ((16, 20), (37, 53)), ((30, 40), (30, 17))])
def test_torch_area_is_adaptive_average_pooling(src, dst):
    x = np.random.default_rng(0).uniform(-1, 1, (*src, 3))
    ref = F.interpolate(torch.from_numpy(x.transpose(2, 0, 1)[None]), size=dst, mode="area")[0].numpy()
    assert np.abs(od.torch_area(x, dst) - ref.transpose(1, 2, 0)).max() < 1e-12


def test_model_input_resamples_before_rounding():
    rgb = np.array([[[0, 0, 0], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]]], np.uint8)  # a 2x2 block whose mean is 0.25
    x = im.model_input(rgb, (1, 1))
    assert x.shape == (3, 1, 1) and np.allclose(x, (0.25 / 255 - 0.5) / 0.5)  # not rounded to level 0
    assert np.array_equal(im.model_input(rgb, (2, 2)), im.normalize(rgb))


def _identity_model(x: np.ndarray) -> np.ndarray:
    """A 'model' whose matte is the red channel: the demos' steps become visible."""
    return (x[:, :1] + 1.0) / 2.0


def test_the_onnx_demo_truncates_and_the_project_rounds():
    rgb = np.full((512, 512, 3), 10, np.uint8)  # the rule's size itself: no resampling anywhere
    demo = od.onnx_demo_matte(rgb, _identity_model)
    # (10 - 127.5) / 127.5 -> float32 -> (x + 1) / 2 * 255 falls just below 10, and the demo truncates
    assert demo.shape == (512, 512) and np.all(demo == 9)
    ours = im.to_uint8(im.matte_to_size(_identity_model(im.model_input(rgb, (512, 512))[None])[0], (512, 512)))
    assert np.all(ours == 10)
    assert od.agreement(ours, demo).pct_over_one_level == 0.0


def test_demos_resize_to_the_official_rule_and_back():
    seen = []

    def model(x):
        seen.append(x.shape)
        return _identity_model(x)

    rgb = np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)  # grown to 512x672
    for demo in (od.onnx_demo_matte, od.pytorch_demo_matte):
        assert demo(rgb, model).shape == (150, 200)
    assert seen == [(1, 3, 512, 672)] * 2


def test_agreement_figures():
    a = np.array([[0, 0, 255, 255]], np.uint8)
    b = np.array([[0, 2, 255, 126]], np.uint8)
    g = od.agreement(a, b)
    assert g.iou == 0.5 and g.max_error == pytest.approx(129 / 255)
    assert g.mae == pytest.approx((2 + 129) / 4 / 255) and g.pct_over_one_level == 50.0
    assert g.pct_over_two_levels == 25.0
    assert od.agreement(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8)).iou == 1.0
    with pytest.raises(ValueError, match="different sizes"):
        od.agreement(a, a.T)
