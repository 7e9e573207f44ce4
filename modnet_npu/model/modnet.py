"""MODNet (Ke et al., "Is a Green Screen Really Necessary for Real-Time Portrait
Matting?", CVPR 2021) in plain PyTorch, for inference.

The file reads top-down like the paper's figure: building blocks (IBNorm,
Conv2dIBNormRelu, SEBlock), the MobileNetV2 backbone, the low-resolution,
high-resolution and fusion branches, then ``MODNet``. Module names are the
official ones (``backbone.model.features.N``, ``lr_branch.conv_lr16x``,
``hr_branch.conv_hr2x``, ``f_branch.conv_f`` ...), so official checkpoints load
with ``strict=True`` after :func:`remap_official_state_dict`.

Differences from the official code, none of which changes the maths:

* InstanceNorm is written out as mean/variance (eps 1e-5) instead of
  ``nn.InstanceNorm2d``: some accelerator stacks (Ascend among them) lack a fast
  or exact InstanceNorm kernel, while mean/var lowers to primitive reductions.
* The training-only heads ``lr_branch.conv_lr`` and ``hr_branch.conv_hr`` are
  absent; ``forward`` returns the fused matte only.
* ``lr_branch`` does not hold a second reference to the backbone, so each
  backbone weight appears once in ``state_dict()``.

This module knows nothing of ONNX.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from modnet_npu.errors import ModnetError
from modnet_npu.model.shape import SIZE_MULTIPLE  # torch-free home (the image code imports it), re-exported

INSTANCE_NORM_EPS = 1e-5


@dataclass(frozen=True)
class MODNetConfig:
    """Every channel count of the network, in one place."""

    in_channels: int = 3
    hr_channels: int = 32
    backbone_expansion: int = 6
    # channels of enc2x, enc4x, enc8x, enc16x, enc32x
    enc_channels: tuple[int, int, int, int, int] = (16, 24, 32, 96, 1280)
    se_reduction: int = 4


# --------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------


def instance_norm(x: torch.Tensor, eps: float = INSTANCE_NORM_EPS) -> torch.Tensor:
    """Affine-free InstanceNorm as mean/variance over H and W.

    Statistics are taken in float32 even for half-precision input: the variance
    of an un-normalised activation map overflows or loses all precision in fp16.
    """
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
    return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype)


class IBNorm(nn.Module):
    """First half of the channels through BatchNorm, the rest through InstanceNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bnorm_channels = channels // 2
        self.inorm_channels = channels - self.bnorm_channels
        self.bnorm = nn.BatchNorm2d(self.bnorm_channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn_x = self.bnorm(x[:, : self.bnorm_channels])
        in_x = instance_norm(x[:, self.bnorm_channels :])
        return torch.cat((bn_x, in_x), dim=1)


class Conv2dIBNormRelu(nn.Module):
    """Conv2d (with bias) -> IBNorm -> ReLU (the paper's conv-IBNorm-ReLU block)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        with_ibn: bool = True,
        with_relu: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=True)
        ]
        if with_ibn:
            layers.append(IBNorm(out_channels))
        if with_relu:
            layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: channel attention from the global average."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(self.pool(x).flatten(1))  # (N, C)
        return x * w[:, :, None, None]


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _downsample(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------
# backbone: MobileNetV2, width 1.0
# --------------------------------------------------------------------------


def _conv_bn_relu6(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: (pw expand) -> dw 3x3 -> pw linear, residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = round(inp * expansion)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [
                nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """The feature extractor only (no classifier), as ``features[0..18]``."""

    # (expansion, out channels, repeats, first stride); None = the config's expansion
    SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
        (1, 16, 1, 1),
        (None, 24, 2, 2),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    )

    def __init__(self, in_channels: int, expansion: int, last_channels: int) -> None:
        super().__init__()
        channels = 32
        features: list[nn.Module] = [_conv_bn_relu6(in_channels, channels, 3, 2)]
        for t, out, repeats, first_stride in self.SETTINGS:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                features.append(InvertedResidual(channels, out, stride, t or expansion))
                channels = out
        features.append(_conv_bn_relu6(channels, last_channels, 1, 1))
        self.features = nn.Sequential(*features)


class MobileNetV2Backbone(nn.Module):
    """Returns the encoder features MODNet uses: enc2x, enc4x and enc32x."""

    ENC2X_END, ENC4X_END = 2, 4  # features[:2] -> 1/2, features[2:4] -> 1/4

    def __init__(self, cfg: MODNetConfig) -> None:
        super().__init__()
        self.model = MobileNetV2(cfg.in_channels, cfg.backbone_expansion, cfg.enc_channels[4])

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.model.features
        enc2x = f[: self.ENC2X_END](img)  # (N, 16, H/2, W/2)
        enc4x = f[self.ENC2X_END : self.ENC4X_END](enc2x)  # (N, 24, H/4, W/4)
        enc32x = f[self.ENC4X_END :](enc4x)  # (N, 1280, H/32, W/32)
        return enc2x, enc4x, enc32x


# --------------------------------------------------------------------------
# the three branches
# --------------------------------------------------------------------------


class LRBranch(nn.Module):
    """Low-resolution semantic branch: enc32x -> lr8x."""

    def __init__(self, cfg: MODNetConfig) -> None:
        super().__init__()
        enc = cfg.enc_channels
        self.se_block = SEBlock(enc[4], cfg.se_reduction)
        self.conv_lr16x = Conv2dIBNormRelu(enc[4], enc[3], 5)
        self.conv_lr8x = Conv2dIBNormRelu(enc[3], enc[2], 5)

    def forward(self, enc32x: torch.Tensor) -> torch.Tensor:
        enc32x = self.se_block(enc32x)
        lr16x = self.conv_lr16x(_upsample2x(enc32x))  # (N, 96, H/16, W/16)
        return self.conv_lr8x(_upsample2x(lr16x))  # (N, 32, H/8, W/8)


class HRBranch(nn.Module):
    """High-resolution detail branch: image + enc2x + enc4x + lr8x -> hr2x."""

    def __init__(self, cfg: MODNetConfig) -> None:
        super().__init__()
        hr, enc, img = cfg.hr_channels, cfg.enc_channels, cfg.in_channels
        self.tohr_enc2x = Conv2dIBNormRelu(enc[0], hr, 1)
        self.conv_enc2x = Conv2dIBNormRelu(hr + img, hr, 3, stride=2)
        self.tohr_enc4x = Conv2dIBNormRelu(enc[1], hr, 1)
        self.conv_enc4x = Conv2dIBNormRelu(2 * hr, 2 * hr, 3)
        self.conv_hr4x = nn.Sequential(
            Conv2dIBNormRelu(3 * hr + img, 2 * hr, 3),
            Conv2dIBNormRelu(2 * hr, 2 * hr, 3),
            Conv2dIBNormRelu(2 * hr, hr, 3),
        )
        self.conv_hr2x = nn.Sequential(
            Conv2dIBNormRelu(2 * hr, 2 * hr, 3),
            Conv2dIBNormRelu(2 * hr, hr, 3),
            Conv2dIBNormRelu(hr, hr, 3),
            Conv2dIBNormRelu(hr, hr, 3),
        )

    def forward(
        self, img: torch.Tensor, enc2x: torch.Tensor, enc4x: torch.Tensor, lr8x: torch.Tensor
    ) -> torch.Tensor:
        img2x = _downsample(img, 0.5)
        img4x = _downsample(img, 0.25)
        enc2x = self.tohr_enc2x(enc2x)  # (N, 32, H/2, W/2)
        hr4x = self.conv_enc2x(torch.cat((img2x, enc2x), dim=1))  # (N, 32, H/4, W/4)
        enc4x = self.tohr_enc4x(enc4x)
        hr4x = self.conv_enc4x(torch.cat((hr4x, enc4x), dim=1))  # (N, 64, H/4, W/4)
        lr4x = _upsample2x(lr8x)
        hr4x = self.conv_hr4x(torch.cat((hr4x, lr4x, img4x), dim=1))  # (N, 32, H/4, W/4)
        hr2x = _upsample2x(hr4x)
        return self.conv_hr2x(torch.cat((hr2x, enc2x), dim=1))  # (N, 32, H/2, W/2)


class FusionBranch(nn.Module):
    """Fuses semantics (lr8x) and detail (hr2x) into the full-resolution matte."""

    def __init__(self, cfg: MODNetConfig) -> None:
        super().__init__()
        hr, enc, img = cfg.hr_channels, cfg.enc_channels, cfg.in_channels
        self.conv_lr4x = Conv2dIBNormRelu(enc[2], hr, 5)
        self.conv_f2x = Conv2dIBNormRelu(2 * hr, hr, 3)
        self.conv_f = nn.Sequential(
            Conv2dIBNormRelu(hr + img, hr // 2, 3),
            Conv2dIBNormRelu(hr // 2, 1, 1, with_ibn=False, with_relu=False),
        )

    def forward(self, img: torch.Tensor, lr8x: torch.Tensor, hr2x: torch.Tensor) -> torch.Tensor:
        lr4x = self.conv_lr4x(_upsample2x(lr8x))  # (N, 32, H/4, W/4)
        lr2x = _upsample2x(lr4x)
        f2x = self.conv_f2x(torch.cat((lr2x, hr2x), dim=1))  # (N, 32, H/2, W/2)
        f = self.conv_f(torch.cat((_upsample2x(f2x), img), dim=1))  # (N, 1, H, W)
        return torch.sigmoid(f)


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------


def check_input_size(height: int, width: int) -> None:
    """Raise ValueError unless both sides are positive multiples of 32."""
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ValueError(
            f"MODNet needs height and width that are positive multiples of {SIZE_MULTIPLE}, "
            f"got {height}x{width}"
        )


class MODNet(nn.Module):
    """Trimap-free portrait matting.

    Input: normalised RGB ``(N, 3, H, W)`` in [-1, 1], H and W multiples of 32.
    Output: alpha matte ``(N, 1, H, W)`` in [0, 1].
    """

    def __init__(self, cfg: MODNetConfig = MODNetConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = MobileNetV2Backbone(cfg)
        self.lr_branch = LRBranch(cfg)
        self.hr_branch = HRBranch(cfg)
        self.f_branch = FusionBranch(cfg)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.dim() != 4 or img.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"MODNet expects input of shape (N, {self.cfg.in_channels}, H, W), "
                f"got {tuple(img.shape)}"
            )
        check_input_size(int(img.shape[2]), int(img.shape[3]))
        enc2x, enc4x, enc32x = self.backbone(img)
        lr8x = self.lr_branch(enc32x)
        hr2x = self.hr_branch(img, enc2x, enc4x, lr8x)
        return self.f_branch(img, lr8x, hr2x)


# --------------------------------------------------------------------------
# official checkpoints
# --------------------------------------------------------------------------

_TRAINING_ONLY_PREFIXES = ("lr_branch.conv_lr.", "hr_branch.conv_hr.")
_DUPLICATE_PREFIX = "lr_branch.backbone."


class CheckpointError(ModnetError, ValueError):
    """An official-style checkpoint that does not fit MODNet."""


def remap_official_state_dict(
    state: Mapping[str, torch.Tensor],
) -> "OrderedDict[str, torch.Tensor]":
    """Map an official MODNet checkpoint onto this model's keys.

    Strips the ``module.`` prefix that ``nn.DataParallel`` adds, drops the
    training-only heads, and drops the second copy of the backbone under
    ``lr_branch.backbone.`` after checking it equals the first. Key names are
    otherwise identical, so the result loads with ``strict=True``.
    """
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    duplicates: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith(_TRAINING_ONLY_PREFIXES):
            continue
        if key.startswith(_DUPLICATE_PREFIX):
            duplicates["backbone." + key[len(_DUPLICATE_PREFIX) :]] = value
            continue
        # nn.InstanceNorm2d(affine=False) keeps no state, but guard against
        # checkpoints made with track_running_stats=True
        if ".inorm." in key:
            continue
        out[key] = value
    for key, value in duplicates.items():
        if key not in out:
            raise CheckpointError(f"checkpoint has {_DUPLICATE_PREFIX}{key[9:]} but no {key}")
        if value.shape != out[key].shape or not torch.equal(value, out[key]):
            raise CheckpointError(f"checkpoint's two copies of {key} differ")
    return out


def load_checkpoint(path: str) -> MODNet:
    """MODNet from an official checkpoint or a state dict saved by this tool."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict")
    model = MODNet()
    try:
        model.load_state_dict(remap_official_state_dict(state), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit MODNet: {str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}") from None
    return model.eval()
