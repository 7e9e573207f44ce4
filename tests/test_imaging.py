from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import imaging as im
from conftest import PORTRAIT


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_sixteen_bit_gray_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = im.load_image(_png_bytes(Image.fromarray(arr)))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert list(rgb[0, :, 0]) == [0, 128, 255]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    base = Image.open(PORTRAIT).resize((40, 30))
    img = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I", "F") else "PNG"
    rgb = im.load_image(_png_bytes(img, fmt))
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    assert rgb.std() > 10  # content survived


def test_exif_orientation_is_honoured():
    img = Image.open(PORTRAIT).resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    rgb = im.load_image(_png_bytes(img, "JPEG", exif=exif.tobytes()))
    assert rgb.shape == (60, 40, 3)


def test_arrays_and_errors(tmp_path):
    assert im.load_image(np.zeros((4, 5), np.uint16)).shape == (4, 5, 3)
    assert im.load_image(np.ones((4, 5, 4), np.float32))[0, 0, 0] == 255
    with pytest.raises(im.ImageReadError, match="not an image"):
        im.load_image(np.zeros((4, 5, 2), np.uint8))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(im.ImageReadError, match="bad.jpg: not a readable image"):
        im.load_image(str(bad))
    with pytest.raises(im.ImageReadError, match="no such file"):
        im.load_image(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("hw,expect", [
    ((1000, 750), (672, 512)),   # short side above 512: scaled down
    ((300, 200), (768, 512)),    # long side below 512: scaled up
    ((600, 400), (576, 384)),    # neither: only rounded down
    ((33, 47), (512, 704)),
])
def test_official_size_rule(hw, expect):
    assert im.official_size(*hw) == expect


def test_short_side_size_and_resolve():
    assert im.short_side_size(3000, 4000, 256) == (256, 320)
    assert im.resolve_size(256, 10, 10) == (256, 256)
    with pytest.raises(ValueError, match="multiples of 32"):
        im.resolve_size(250, 10, 10)


def test_preprocess_and_postprocess():
    x, size = im.preprocess(str(PORTRAIT))
    assert x.shape == (1, 3, 256, 256) and x.dtype == np.float32 and size == (512, 512)
    assert -1.0 <= x.min() and x.max() <= 1.0
    white = im.normalize(np.full((2, 2, 3), 255, np.uint8))
    assert np.all(white == 1.0) and np.all(im.normalize(np.zeros((2, 2, 3), np.uint8)) == -1.0)
    matte = im.postprocess(np.full((1, 1, 256, 256), 0.5, np.float32), (100, 80))
    assert matte.shape == (100, 80) and matte.dtype == np.uint8 and np.all(matte == 128)


def test_cutout_and_composite():
    rgb = np.full((4, 6, 3), 200, np.uint8)
    alpha = np.zeros((4, 6), np.float32)
    alpha[:, :3] = 1.0
    rgba = im.cutout(rgb, alpha)
    assert rgba.shape == (4, 6, 4) and np.all(rgba[..., 3] == im.to_uint8(alpha))
    bg = im.make_background("#00ff00", rgb)
    out = im.composite(rgb, alpha, bg)
    assert np.all(out[:, :3] == 200) and np.all(out[:, 3:] == [0, 255, 0])
    assert im.make_background("blur", rgb).shape == rgb.shape
    with pytest.raises(ValueError, match="not a colour"):
        im.parse_color("greenish")


def test_cover_keeps_aspect_and_fills():
    bg = np.zeros((10, 40, 3), np.uint8)
    bg[:, 18:22] = 255  # a bright stripe in the middle
    out = im.cover(bg, (20, 20))
    assert out.shape == (20, 20, 3) and out[:, 10].min() > 100


def test_one_frame_delay_removes_a_flicker_only():
    prev = np.zeros((2, 2), np.float32)
    nxt = np.zeros((2, 2), np.float32)
    cur = np.array([[1.0, 0.05], [0.0, 0.0]], np.float32)
    out = im.one_frame_delay(prev, cur, nxt)
    assert out[0, 0] == 0.0 and out[0, 1] == pytest.approx(0.05)
    moving = im.one_frame_delay(np.zeros((1, 1)), np.full((1, 1), 0.5), np.ones((1, 1)))
    assert moving[0, 0] == 0.5  # real motion is kept
