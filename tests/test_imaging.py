from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from modnet_npu.matting import imaging as im
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


def test_a_colour_background_is_broadcast_and_blends_as_a_full_one():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (300, 70, 3), dtype=np.uint8)  # 300 rows: more than one band of 256
    alpha = rng.random((300, 70), dtype=np.float32) * 1.2 - 0.1  # some outside [0, 1]: clipped alike
    colour = (12, 200, 77)
    assert im.make_background("rgb(12,200,77)", rgb) == colour  # a colour stays a colour
    assert im.make_background(colour, rgb) == colour
    full = im.composite(rgb, alpha, np.full((300, 70, 3), colour, np.uint8))
    assert np.array_equal(im.composite(rgb, alpha, colour), full)  # the same float32 arithmetic, bit for bit
    with pytest.raises(ValueError, match="r, g, b"):
        im.composite(rgb, alpha, (1, 2, 3, 4))
    with pytest.raises(ValueError, match="0 to 255"):
        im.composite(rgb, alpha, (0, 256, 0))


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


def test_cover_matches_scaling_the_whole_background_then_cropping():
    rng = np.random.default_rng(1)
    bg = np.repeat(np.repeat(rng.integers(0, 255, (12, 40, 3), dtype=np.uint8), 4, 0), 4, 1)  # smooth-ish blocks
    for size in ((90, 70), (30, 200), (48, 160)):
        h, w = size
        scale = max(h / bg.shape[0], w / bg.shape[1])
        nh, nw = max(h, round(bg.shape[0] * scale)), max(w, round(bg.shape[1] * scale))
        whole = np.asarray(Image.fromarray(bg).resize((nw, nh), Image.Resampling.BILINEAR))
        top, left = (nh - h) // 2, (nw - w) // 2
        expect = whole[top : top + h, left : left + w].astype(int)
        out = im.cover(bg, size)
        assert out.shape == (h, w, 3)
        assert np.abs(out.astype(int) - expect).mean() < 3  # the same picture, up to resampling at the edges


_COVER_MEMORY = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from PIL import Image
from modnet_npu.matting import imaging
Image.fromarray(np.full((100, 5000, 3), 90, np.uint8)).save(sys.argv[2])
photo = np.ones((3000, 4000, 3), np.uint8)
alpha = np.full((3000, 4000), 0.5, np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bg = imaging.make_background(sys.argv[2], photo)
out = imaging.composite(photo, alpha, bg)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert bg.shape == (3000, 4000, 3) and out.shape == (3000, 4000, 3) and out[0, 0, 0] == 46
print((after - before) / 1024)
"""


def test_background_strip_on_a_big_photo_stays_within_memory(tmp_path):
    # a 5000x100 backdrop on a 4000x3000 photo: scaling first built 150000x3000 (peak +4.3 GB)
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", _COVER_MEMORY, str(ROOT), str(tmp_path / "strip.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    peak_mb = float(proc.stdout.strip())
    assert peak_mb < 200, f"peak grew by {peak_mb:.0f} MB"


def test_bytes_and_streams_are_named_without_an_object_repr():
    for data in (b"garbage", bytearray(b"garbage"), io.BytesIO(b"garbage")):
        with pytest.raises(im.ImageReadError) as info:
            im.load_image(data)
        msg = str(info.value)
        assert "object at 0x" not in msg and "<_io" not in msg and "not a readable image" in msg
    with pytest.raises(im.ImageReadError, match=r"^image data \(7 bytes\): not a readable image"):
        im.load_image(b"garbage")
    assert im.load_image(io.BytesIO(_png_bytes(Image.new("RGB", (5, 4))))).shape == (4, 5, 3)


def test_path_messages_do_not_repeat_the_path(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nothing like a png")
    with pytest.raises(im.ImageReadError) as info:
        im.load_image(str(bad))
    assert str(info.value).count(str(bad)) == 1


@pytest.mark.parametrize("text", ["99999", "4097", "64x5000", "abc", "-32", "0", "16"])
def test_size_spec_is_bounded(text):
    with pytest.raises(ValueError):
        im.parse_size_spec(text)


def test_max_side_can_be_raised_explicitly():
    assert im.parse_size_spec("6000", max_side=8192) == im.ShortSide(6000)
    with pytest.raises(ValueError, match="exceeds the limit of 4096"):
        im.input_size(im.ShortSide(512), 100, 10_000)
    assert im.input_size(im.ShortSide(512), 100, 10_000, max_side=60_000) == (512, 51200)
