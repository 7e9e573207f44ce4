"""The plan: which boundaries exist, in faithful module names.

Every converted unit's output, the backbone stages enc2x..enc32x (the official
backbone's split), the branch outputs and the matte; each with the chain of
faithful modules the local float64 rerun applies.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from modnet_npu.model.modnet import MODNet

# The official MODNet backbone's split of MobileNetV2's features into the encoder stages:
# each stage is the output of this block.
STAGES: dict[str, int] = {"enc2x": 1, "enc4x": 3, "enc8x": 6, "enc16x": 13, "enc32x": 18}

# branch rows: (row name, faithful module giving the tensor, the unit that computes it)
BRANCHES: tuple[tuple[str, str, str], ...] = (
    ("lr_branch", "lr_branch", "lr_branch.conv_lr8x.layers.0"),
    ("hr_branch", "hr_branch", "hr_branch.conv_hr2x.3.layers.0"),
    ("f_branch.conv_f", "f_branch.conv_f", "f_branch.conv_f.1.layers.0"),
)
MATTE = "matte"

BACKBONE = "backbone.model.features."


@dataclass(frozen=True)
class Boundary:
    layer: str  # row name
    unit: str  # the converter's unit whose ONNX output is this tensor ("" for the matte)
    out_module: str | None  # faithful module whose output is the tensor; None: the model's output
    chain: tuple[str, ...]  # faithful modules the local reference runs, in order
    sigmoid: bool = False  # the local reference ends with a sigmoid (the matte)
    residual: bool = False  # the tensor is the unit's output plus the block's input (a stage)


def unit_chain(model: MODNet, unit: str) -> tuple[str, ...]:
    """The unit's module and the norm/activation modules after it in its Sequential, up to the next layer."""
    parent, _, index = unit.rpartition(".")
    seq = model.get_submodule(parent)
    if not isinstance(seq, nn.Sequential):
        return (unit,)
    chain = [unit]
    for i in range(int(index) + 1, len(seq)):
        if isinstance(seq[i], (nn.Conv2d, nn.Linear)):
            break
        chain.append(f"{parent}.{i}")
    return tuple(chain)


def plan(model: MODNet, units: Sequence[str]) -> list[Boundary]:
    """Every boundary of the faithful model, units first within equal tensors; ``units`` in execution order.

    A unit inside another unit's norm (IBNorm's BatchNorm, a unit of its own to
    the converter) gets no row: its output is half a tensor before the concat,
    and its conv's row (and local error) covers it.
    """
    chains = {u: unit_chain(model, u) for u in units}
    inner = {u for u in units if any(u.startswith(m + ".") for c in chains.values() for m in c[1:])}
    out = [Boundary(u, u, chains[u][-1], chains[u]) for u in units if u not in inner]
    for stage, k in STAGES.items():
        block = f"{BACKBONE}{k}"
        last = [u for u in units if u.startswith(block + ".")][-1]
        residual = bool(getattr(model.get_submodule(block), "use_res_connect", False))
        out.append(Boundary(stage, last, block, (block,), residual=residual))
    for name, module, unit in BRANCHES:
        out.append(Boundary(name, unit, module, chains[unit]))
    last = BRANCHES[-1][2]
    out.append(Boundary(MATTE, "", None, chains[last], sigmoid=True))
    return out
