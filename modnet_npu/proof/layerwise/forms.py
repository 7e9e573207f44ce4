"""The device model's forms: where to hook the faithful ``MODNet`` or the optimized ``OptimizedMODNet`` for a boundary."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modnet_npu.model.modnet import MODNet
from modnet_npu.model.optimized import OptimizedMODNet
from modnet_npu.proof.layerwise.plan import BACKBONE, STAGES, Boundary
from modnet_npu.proof.layerwise.report import LayerwiseError


def optimized_module_name(faithful: MODNet, name: str) -> str:
    """The ``OptimizedMODNet`` module computing what faithful module ``name`` (a unit or a block) does.

    ``OptimizedMODNet`` keeps one module per unit: backbone blocks under ``enc2x``,
    ``enc4x``, ``enc32x`` (features 0-1, 2-3, 4-18), a block's convs renumbered
    under ``layers``, and each branch's Conv2dIBNormRelu by its own name.
    """
    if name.startswith(BACKBONE):
        parts = name[len(BACKBONE):].split(".")
        k = int(parts[0])
        block = f"enc2x.{k}" if k < 2 else f"enc4x.{k - 2}" if k < 4 else f"enc32x.{k - 4}"
        if len(parts) == 1:
            return block
        seq_name = name.rpartition(".")[0]
        seq = faithful.get_submodule(seq_name)
        nth = sum(isinstance(m, nn.Conv2d) for m in list(seq)[: int(parts[-1])])
        return f"{block}.layers.{nth}" if parts[1] == "conv" else f"{block}.{nth}"
    if name.startswith("lr_branch.se_block."):
        raise LayerwiseError(f"{name}: OptimizedMODNet applies its activation in forward, after the module")
    if name.endswith(".layers.0") and name.split(".")[0] in ("lr_branch", "hr_branch", "f_branch"):
        return name.split(".", 1)[1][: -len(".layers.0")]
    raise LayerwiseError(f"{name}: OptimizedMODNet has no module of its own for it")


@dataclass(frozen=True)
class Taps:
    """Where to hook the device model for one boundary."""

    out_module: str | None  # None: the model's output
    in_module: str


def device_taps(model: nn.Module, faithful: MODNet, b: Boundary) -> Taps:
    """The device model's modules for boundary ``b``; LayerwiseError with the reason when it has none."""
    if not isinstance(model, OptimizedMODNet):
        return Taps(b.out_module, b.chain[0])
    first = b.chain[0]
    in_module = optimized_module_name(faithful, first)
    if b.out_module is None:
        return Taps(None, in_module)
    # a stage is its block's output; a unit and a branch are the (last) unit's module output
    out = optimized_module_name(faithful, b.out_module if b.layer in STAGES else b.unit)
    if isinstance(faithful.get_submodule(first), nn.Conv2d):
        dev, ref = model.get_submodule(out), faithful.get_submodule(first)
        if dev.conv.weight.shape != ref.weight.shape:
            raise LayerwiseError(
                f"{out} has weight {tuple(dev.conv.weight.shape)}; {first} has {tuple(ref.weight.shape)}"
            )
    return Taps(out, in_module)


def input_dtype(model: nn.Module) -> torch.dtype:
    # OptimizedMODNet keeps its backbone in float32 and takes float32 input at any precision
    if isinstance(model, OptimizedMODNet):
        return torch.float32
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
