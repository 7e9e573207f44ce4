"""serve.py's engine options are inference.py's (one group), and the service sizes images as Matter does."""
from __future__ import annotations

import types

import pytest

from modnet_npu.runtime.options import EngineOptions, engine_options_from


def test_serve_parses_every_engine_option():
    import inference
    import serve

    argv = ["--strict-fp32", "--max-side", "5000", "--size", "32x4160", "--model-form", "faithful", "--threads", "2"]
    options = engine_options_from(serve.build_parser().parse_args(argv))
    assert options == EngineOptions(strict_fp32=True, max_side=5000, size=(32, 4160), model_form="faithful",
                                    threads=2)
    assert options == engine_options_from(inference.build_parser().parse_args(["x.jpg", *argv]))


@pytest.fixture(scope="module")
def wide_matter(flavour_files):
    from modnet_npu.matting.matter import Matter

    with Matter(model=flavour_files["official"], backend="torch", device="cpu", threads=1, size="32x4160",
                max_side=5000) as matter:
        yield matter


def _settings_only():
    """A stand-in for a service: its default limits, nothing started."""
    from modnet_npu.service.limits import ServiceSettings

    return types.SimpleNamespace(settings=ServiceSettings())


def test_the_service_sizes_with_the_servers_max_side(wide_matter):
    from modnet_npu.service.app import Service

    # Service.model_size reads only the service's settings: called unbound, without starting one
    assert Service.model_size(_settings_only(), wide_matter, None, 48, 2080) == (32, 4160)
    assert Service.model_size(_settings_only(), wide_matter, (64, 96), 48, 2080) == (64, 96)


def test_an_image_too_wide_for_the_limit_is_a_422_not_a_500(flavour_files):
    from modnet_npu.matting.imaging import ShortSide
    from modnet_npu.matting.matter import Matter
    from modnet_npu.service.app import ApiError, Service

    with Matter(model=flavour_files["official"], backend="torch", device="cpu", threads=1, size=512) as matter:
        with pytest.raises(ApiError) as refused:
            Service.model_size(_settings_only(), matter, None, 40, 4000)  # 512 x 51200 at a short side of 512
        assert refused.value.status == 422 and "exceeds the limit of 4096" in refused.value.message
        with pytest.raises(ApiError, match="size: model input"):
            Service.model_size(_settings_only(), matter, ShortSide(512), 40, 4000)


def test_a_size_asked_of_a_fixed_size_file_is_refused_by_the_one_rule(webnn_file):
    from modnet_npu.matting.matter import Matter
    from modnet_npu.service.app import ApiError, Service

    with Matter(model=webnn_file, backend="ort", threads=1) as matter:  # its input is fixed at 256x256
        with pytest.raises(ValueError) as direct:
            matter.model_size(48, 64, size=(64, 64))
        with pytest.raises(ApiError) as refused:
            Service.model_size(_settings_only(), matter, (64, 64), 48, 64)
        assert refused.value.status == 422 and refused.value.message == f"size: {direct.value}"
        assert "takes 256x256 only on the ort backend" in refused.value.message
        # no size asked: the file's own, past --max-model-pixels or not (the file decides, not the request)
        assert Service.model_size(_settings_only(), matter, None, 4000, 3000) == (256, 256)
