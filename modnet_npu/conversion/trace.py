"""The PyTorch side of the conversion: MODNet's weight-carrying units, by tracing data.

The model is built on the ``meta`` device (no weight initialisation), given
zeroed CPU memory and run once on a small input under a dispatch mode that
follows data through every operator, so each Conv2d, BatchNorm2d and Linear
learns which units (or the image input) its input came from. A BatchNorm
reading a Conv's output directly joins that Conv's unit, as on the ONNX side.

Not on ``meta`` itself: torch's Python meta kernels (batch norm's among them)
import ``torch._dynamo`` there, seconds that the torch path without
``--compile`` never needs; the CPU's own kernels at 64x64 cost less.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from modnet_npu.conversion.labels import INPUT, BnLabel, ConvLabel, Label, LinearLabel
from modnet_npu.model.modnet import MODNet, MODNetConfig


@dataclass(frozen=True)
class ModelUnit:
    kind: str
    label: Label
    conv: str | None  # module names
    bn: str | None
    linear: str | None
    preds: frozenset[str]

    @property
    def name(self) -> str:
        return self.conv or self.bn or self.linear or "?"


class _Provenance(TorchDispatchMode):
    """Tracks which weighted modules every tensor's data came from."""

    def __init__(self) -> None:
        super().__init__()
        self.deps: dict[int, frozenset[str]] = {}
        self.keep: list[torch.Tensor] = []  # ids stay unique while tensors live

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._disable_dynamo otherwise, whose first call imports
        # torch._dynamo (a second or more): nothing is compiled here, and the torch path without --compile
        # should not pay for it (the hook torch's own docstring shows for opting out)
        return False

    def of(self, obj: object) -> frozenset[str]:
        leaves, _ = tree_flatten(obj)
        return frozenset().union(*(self.deps.get(id(t), frozenset()) for t in leaves if isinstance(t, torch.Tensor)))

    def set(self, t: torch.Tensor, value: frozenset[str]) -> None:
        self.deps[id(t)] = value
        self.keep.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        value = self.of((args, kwargs))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.set(t, value | self.deps.get(id(t), frozenset()))
        return out


def _new_unit(module: nn.Module, name: str, preds: frozenset[str]) -> ModelUnit:
    if isinstance(module, nn.Conv2d):
        k, s = module.kernel_size, module.stride
        label = ConvLabel("conv", module.out_channels, module.in_channels, k[0], k[1], s[0], s[1], module.groups)
        return ModelUnit("conv", label, name, None, None, preds)
    if isinstance(module, nn.BatchNorm2d):
        return ModelUnit("bn", BnLabel("bn", module.num_features), None, name, None, preds)
    return ModelUnit("linear", LinearLabel("linear", module.in_features, module.out_features), None, None, name, preds)


def trace_model_units(cfg: MODNetConfig = MODNetConfig(), size: int = 64) -> list[ModelUnit]:
    """The weight-carrying units of MODNet in execution order, with their predecessors."""
    with torch.device("meta"):
        model = MODNet(cfg).eval()
    model = model.to_empty(device="cpu")  # real kernels, no Python meta kernels (see the module's docstring)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.zero_()  # values never matter, but uninitialised memory may hold NaN or denormals
    tracker = _Provenance()
    names = {m: n for n, m in model.named_modules()}
    produced_by_conv: dict[int, str] = {}
    units: list[ModelUnit] = []
    position: dict[str, int] = {}  # module name -> its unit's place in ``units``

    def pre(module: nn.Module, inputs: tuple) -> None:
        name = names[module]
        conv = produced_by_conv.get(id(inputs[0])) if isinstance(module, nn.BatchNorm2d) else None
        if conv is not None:  # BatchNorm straight after a Conv: one unit
            i = position[name] = position[conv]
            units[i] = dataclasses.replace(units[i], bn=name)
            return
        position[name] = len(units)
        units.append(_new_unit(module, name, tracker.of(inputs)))

    def post(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names[module]
        tracker.set(output, frozenset([units[position[name]].name]))
        if isinstance(module, nn.Conv2d):
            produced_by_conv[id(output)] = name

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    x = torch.zeros(1, cfg.in_channels, size, size)
    try:
        with tracker:
            tracker.set(x, frozenset([INPUT]))
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return units


@functools.lru_cache(maxsize=4)
def model_units(cfg: MODNetConfig = MODNetConfig()) -> tuple[ModelUnit, ...]:
    """:func:`trace_model_units` once per config: the trace is the same for every file (a tenth of a second)."""
    return tuple(trace_model_units(cfg))
