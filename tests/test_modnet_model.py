from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modnet_npu.model.modnet import load_checkpoint
from modnet_npu.model.modnet import CheckpointError, MODNet, instance_norm, remap_official_state_dict


def test_layout_matches_the_published_network():
    model = MODNet()
    assert sum(p.numel() for p in model.parameters()) == 6_476_609
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 69
    keys = set(model.state_dict())
    for key in (
        "backbone.model.features.0.0.weight",
        "backbone.model.features.18.1.running_var",
        "lr_branch.se_block.fc.0.weight",
        "lr_branch.conv_lr16x.layers.0.weight",
        "lr_branch.conv_lr16x.layers.1.bnorm.running_mean",
        "hr_branch.conv_hr4x.0.layers.0.weight",
        "hr_branch.conv_hr2x.3.layers.1.bnorm.weight",
        "f_branch.conv_f.1.layers.0.weight",
    ):
        assert key in keys, key
    assert not any("inorm" in k or "conv_lr." in k or "conv_hr." in k for k in keys)


def test_instance_norm_is_mean_var_and_matches_torch():
    x = torch.randn(2, 5, 16, 24) * 3 + 1
    assert torch.allclose(instance_norm(x), F.instance_norm(x, eps=1e-5), atol=1e-5)


def test_instance_norm_statistics_survive_half_precision():
    x = (torch.randn(1, 4, 64, 64) * 300).half()  # x**2 overflows fp16
    y = instance_norm(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.allclose(y.float(), F.instance_norm(x.float(), eps=1e-5), atol=1e-2)


@pytest.mark.parametrize("shape", [(2, 3, 64, 96), (1, 3, 32, 32)])
def test_any_batch_and_multiple_of_32(shape):
    with torch.no_grad():
        out = MODNet().eval()(torch.randn(shape))
    assert out.shape == (shape[0], 1, *shape[2:])
    assert float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.mark.parametrize("shape", [(1, 3, 250, 256), (1, 3, 256, 100), (1, 4, 64, 64), (3, 64, 64)])
def test_bad_sizes_raise_naming_the_size(shape):
    with pytest.raises(ValueError) as info:
        MODNet().eval()(torch.randn(shape))
    assert str(tuple(shape)[-2]) in str(info.value) or str(tuple(shape)) in str(info.value)


@pytest.mark.parametrize("hw", [(64, 64), (96, 160)])
def test_forward_pinned_to_no_device(hw):
    model = MODNet().to("meta").eval()
    out = model(torch.empty(2, 3, *hw, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 1, *hw)


def _official_style(model: MODNet) -> dict[str, torch.Tensor]:
    """A state dict as the official DataParallel training saved it."""
    state = {}
    for k, v in model.state_dict().items():
        state["module." + k] = v.clone()
        if k.startswith("backbone."):
            state["module.lr_branch." + k] = v.clone()
    state["module.lr_branch.conv_lr.layers.0.weight"] = torch.randn(1, 32, 3, 3)
    state["module.hr_branch.conv_hr.0.layers.0.weight"] = torch.randn(32, 35, 3, 3)
    return state


def test_official_checkpoint_loads_strict(tmp_path, seeded_model):
    path = tmp_path / "modnet_photographic_portrait_matting.ckpt"
    torch.save(_official_style(seeded_model), path)
    model = load_checkpoint(str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), seeded_model(x))


def test_official_checkpoint_with_diverging_backbone_copy_is_refused(seeded_model):
    state = _official_style(seeded_model)
    state["module.lr_branch.backbone.model.features.0.0.weight"] += 1
    with pytest.raises(CheckpointError, match="differ"):
        remap_official_state_dict(state)
