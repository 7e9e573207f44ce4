"""The optimized MODNet (``--model-form optimized``): the same function as
``modnet_model.MODNet`` in fewer operator launches.

Produced from a loaded faithful model by :func:`optimize` (the faithful model is
left as it was: the optimized one owns copies of every parameter it uses):

* every BatchNorm is folded into its convolution: the backbone's, and the
  BatchNorm half of each IBNorm (it acts on the first ``c // 2`` output channels,
  so it folds into those rows of the conv's weight and bias);
* what is left of IBNorm — InstanceNorm on the second half — runs in place on a
  view of the conv's output: no ``Slice``/``contiguous``/``cat`` copies;
* activations (ReLU, ReLU6 as ``clamp_``, sigmoid) and residual adds run in place.

In eager mode each dispatched operator is a kernel launch on an accelerator,
and at 256x256 launches, not arithmetic, set MODNet's latency there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modnet_npu.model import precision as precisions
from modnet_npu.model.modnet import INSTANCE_NORM_EPS, IBNorm, MODNet, MODNetConfig, check_input_size


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` (on ``rows`` of the output channels only), in float64."""
    w = conv.weight.detach().double().clone()
    b = (conv.bias.detach().double().clone() if conv.bias is not None
         else torch.zeros(conv.out_channels, dtype=torch.float64, device=w.device))
    rows = rows or slice(0, conv.out_channels)
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    w[rows] *= scale[:, None, None, None]
    b[rows] = (b[rows] - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()
    return w, b


def _conv_from(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    groups=conv.groups, bias=True)
    with torch.no_grad():
        new.weight.copy_(weight.to(conv.weight.dtype))
        new.bias.copy_(bias.to(conv.weight.dtype))
    return new.to(conv.weight.device)


class OptimizedCIR(nn.Module):
    """Conv (IBNorm's BatchNorm folded in) -> in-place InstanceNorm on the second half -> ReLU."""

    def __init__(self, conv: nn.Conv2d, norm_from: int | None, relu: bool) -> None:
        super().__init__()
        self.conv = conv
        self.norm_from = norm_from  # first InstanceNorm channel; None: no IBNorm
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.norm_from is not None:
            v = y[:, self.norm_from :]
            if v.dtype in (torch.float16, torch.bfloat16):
                # statistics in fp32: the variance overflows or loses precision in half
                var, mean = torch.var_mean(v.float(), dim=(2, 3), keepdim=True, correction=0)
                v.sub_(mean.to(v.dtype)).mul_(var.add_(INSTANCE_NORM_EPS).rsqrt_().to(v.dtype))
            else:
                var, mean = torch.var_mean(v, dim=(2, 3), keepdim=True, correction=0)
                v.sub_(mean).mul_(var.add_(INSTANCE_NORM_EPS).rsqrt_())
        if self.relu:
            y.relu_()
        return y


class OptimizedConvReLU6(nn.Module):
    """A backbone conv with its BatchNorm folded, then ReLU6 in place (or nothing)."""

    def __init__(self, conv: nn.Conv2d, relu6: bool) -> None:
        super().__init__()
        self.conv = conv
        self.relu6 = relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.clamp_(0.0, 6.0) if self.relu6 else y


class OptimizedInvertedResidual(nn.Module):
    def __init__(self, layers: list[nn.Module], residual: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return y.add_(x) if self.residual else y


def _optimized_cir(cir: nn.Module) -> OptimizedCIR:
    layers = list(cir.layers)
    conv = layers[0]
    ibn = next((m for m in layers if isinstance(m, IBNorm)), None)
    relu = any(isinstance(m, nn.ReLU) for m in layers)
    if ibn is None:
        return OptimizedCIR(_conv_from(conv, conv.weight.detach().double(), conv.bias.detach().double()), None, relu)
    w, b = _fold(conv, ibn.bnorm, slice(0, ibn.bnorm_channels))
    return OptimizedCIR(_conv_from(conv, w, b), ibn.bnorm_channels, relu)


def _linear_copy(linear: nn.Linear) -> nn.Linear:
    """A Linear of its own with ``linear``'s weights: casting or moving one must not change the other."""
    new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _optimized_sequential(seq: nn.Sequential) -> list[OptimizedConvReLU6]:
    """Conv, BN, (ReLU6) runs of a MobileNetV2 Sequential -> folded modules."""
    out, items, i = [], list(seq), 0
    while i < len(items):
        conv, bn = items[i], items[i + 1]
        relu6 = i + 2 < len(items) and isinstance(items[i + 2], nn.ReLU6)
        out.append(OptimizedConvReLU6(_conv_from(conv, *_fold(conv, bn)), relu6))
        i += 3 if relu6 else 2
    return out


class OptimizedMODNet(nn.Module):
    """MODNet for inference only: same inputs and outputs as ``MODNet``, fewer operators.

    Built from a faithful model, whose parameters it copies (folded or not): it
    shares no module or tensor with it.
    """

    def __init__(self, model: MODNet) -> None:
        super().__init__()
        self.cfg: MODNetConfig = model.cfg
        feats = model.backbone.model.features
        blocks: list[nn.Module] = []
        for f in feats:
            if isinstance(f, nn.Sequential):
                blocks.append(nn.Sequential(*_optimized_sequential(f)))
            else:
                blocks.append(OptimizedInvertedResidual(_optimized_sequential(f.conv), f.use_res_connect))
        self.enc2x = nn.Sequential(*blocks[:2])
        self.enc4x = nn.Sequential(*blocks[2:4])
        self.enc32x = nn.Sequential(*blocks[4:])
        se = model.lr_branch.se_block
        self.se_fc1, self.se_fc2 = _linear_copy(se.fc[0]), _linear_copy(se.fc[2])
        lr, hr, fb = model.lr_branch, model.hr_branch, model.f_branch
        self.conv_lr16x, self.conv_lr8x = _optimized_cir(lr.conv_lr16x), _optimized_cir(lr.conv_lr8x)
        self.tohr_enc2x, self.conv_enc2x = _optimized_cir(hr.tohr_enc2x), _optimized_cir(hr.conv_enc2x)
        self.tohr_enc4x, self.conv_enc4x = _optimized_cir(hr.tohr_enc4x), _optimized_cir(hr.conv_enc4x)
        self.conv_hr4x = nn.Sequential(*(_optimized_cir(m) for m in hr.conv_hr4x))
        self.conv_hr2x = nn.Sequential(*(_optimized_cir(m) for m in hr.conv_hr2x))
        self.conv_lr4x, self.conv_f2x = _optimized_cir(fb.conv_lr4x), _optimized_cir(fb.conv_f2x)
        self.conv_f = nn.Sequential(*(_optimized_cir(m) for m in fb.conv_f))
        self.decoder_dtype: torch.dtype | None = None  # None: everything in the parameters' dtype

    def set_precision(self, dtype: torch.dtype) -> "OptimizedMODNet":
        """Run the decoder in ``dtype`` and keep the backbone and SE block in float32.

        The backbone is a tenth of MODNet's arithmetic but the most sensitive part
        to rounding (its errors are re-amplified by every InstanceNorm after it);
        the decoder's large convolutions are where half precision pays.
        """
        backbone = {"enc2x", "enc4x", "enc32x", "se_fc1", "se_fc2"}
        for name, module in self.named_children():
            module.to(torch.float32 if name in backbone else dtype)
        self.decoder_dtype = None if dtype == torch.float32 else dtype
        return self

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        check_input_size(int(img.shape[-2]), int(img.shape[-1]))
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="bilinear", align_corners=False)  # noqa: E731
        half = self.decoder_dtype
        if half is not None:
            img = img.float()
        enc2x = self.enc2x(img)
        enc4x = self.enc4x(enc2x)
        enc32x = self.enc32x(enc4x)
        # low-resolution branch, SE attention with in-place activations
        w = self.se_fc2(self.se_fc1(enc32x.mean((2, 3))).relu_()).sigmoid_()
        enc32x = enc32x * w[:, :, None, None]
        if half is not None:
            img, enc2x, enc4x, enc32x = (t.to(half) for t in (img, enc2x, enc4x, enc32x))
        lr8x = self.conv_lr8x(up(self.conv_lr16x(up(enc32x))))
        # high-resolution branch
        img2x = F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False)
        img4x = F.interpolate(img, scale_factor=0.25, mode="bilinear", align_corners=False)
        enc2x = self.tohr_enc2x(enc2x)
        hr4x = self.conv_enc2x(torch.cat((img2x, enc2x), 1))
        hr4x = self.conv_enc4x(torch.cat((hr4x, self.tohr_enc4x(enc4x)), 1))
        lr4x = up(lr8x)
        hr4x = self.conv_hr4x(torch.cat((hr4x, lr4x, img4x), 1))
        hr2x = self.conv_hr2x(torch.cat((up(hr4x), enc2x), 1))
        # fusion
        lr2x = up(self.conv_lr4x(lr4x))
        f2x = self.conv_f2x(torch.cat((lr2x, hr2x), 1))
        return self.conv_f(torch.cat((up(f2x), img), 1)).sigmoid_()


@torch.no_grad()
def optimize(model: MODNet) -> OptimizedMODNet:
    """The optimized form of a loaded MODNet (eval mode, same device and dtype); ``model`` is left unchanged
    (but for being put in eval mode) and shares nothing with the result."""
    return OptimizedMODNet(model.eval()).eval()


def with_precision(model: nn.Module, precision: str) -> tuple[nn.Module, torch.dtype]:
    """The model set to ``precision`` and the dtype its input should have.

    The optimized model keeps its backbone in float32 (see ``set_precision``)
    and takes float32 input; the faithful model is cast whole, as it is.

    On a CPU, a model in half precision is laid out channels-last (its input
    may keep its own layout): oneDNN runs fp16 and bf16 convolutions in that
    layout, while the NCHW fp16 path is a reference loop (the real MODNet in
    fp16 at 256x256, one thread of a 2-core EPYC without fp16 arithmetic:
    13.2 s NCHW, 0.51 s channels-last, the same errors; bf16 0.12 s -> 0.09 s);
    the whole model, the optimized form's fp32 backbone included. A model in
    fp32 keeps the layout its parity was measured in.
    """
    dtype = precisions.dtype(precision)
    if isinstance(model, OptimizedMODNet):
        model, in_dtype = model.set_precision(dtype), torch.float32
    else:
        model, in_dtype = model.to(dtype), dtype
    if dtype != torch.float32 and all(p.device.type == "cpu" for p in model.parameters()):
        model = model.to(memory_format=torch.channels_last)
    return model, in_dtype
