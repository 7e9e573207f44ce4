"""One encoder for every output: files written by jobs, the service's answers and stdout are the same bytes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from modnet_npu.matting import codec, jobs


def _arrays():
    rng = np.random.default_rng(3)
    return {"matte": rng.integers(0, 256, (24, 40), dtype=np.uint8),
            "rgb": rng.integers(0, 256, (24, 40, 3), dtype=np.uint8),
            "rgba": rng.integers(0, 256, (24, 40, 4), dtype=np.uint8)}


@pytest.mark.parametrize("fmt", codec.FORMATS)
@pytest.mark.parametrize("kind", ["matte", "rgb", "rgba"])
def test_files_and_the_service_get_the_same_bytes(fmt, kind, tmp_path):
    from modnet_npu.service.codec import encode as service_encode

    array = _arrays()[kind]
    encoded = codec.encode(array, fmt)
    data, ctype = service_encode(array, fmt)
    assert data == encoded.data and ctype == encoded.content_type
    if encoded.format == fmt:  # what jobs writes: a cutout is never planned as .jpg
        jobs.save_output(str(tmp_path / f"out.{fmt}"), array)
        assert (tmp_path / f"out.{fmt}").read_bytes() == encoded.data


def test_lossless_where_it_matters():
    arrays = _arrays()
    for kind in ("matte", "rgb", "rgba"):
        png = np.asarray(Image.open(io.BytesIO(codec.encode(arrays[kind], "png").data)))
        assert np.array_equal(png, arrays[kind])
    webp = np.asarray(Image.open(io.BytesIO(codec.encode(arrays["rgba"], "webp").data)))
    assert np.array_equal(webp[..., 3], arrays["rgba"][..., 3])  # the cutout's alpha is kept exactly


def test_jpeg_cannot_hold_alpha():
    rgba = _arrays()["rgba"]
    encoded = codec.encode(rgba, "jpg")
    assert encoded.format == "png" and encoded.content_type == "image/png"
    assert encoded.data[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_gets_what_its_name_says_or_an_error(tmp_path):
    with pytest.raises(ValueError, match="JPEG has no alpha"):
        codec.save(str(tmp_path / "cut.jpg"), _arrays()["rgba"])
    with pytest.raises(ValueError, match="cannot write .gif"):
        codec.save(str(tmp_path / "cut.gif"), _arrays()["rgb"])
    with pytest.raises(ValueError, match="is not one of png, jpg, webp"):
        codec.encode(_arrays()["rgb"], "bmp")
    assert list(tmp_path.iterdir()) == []
