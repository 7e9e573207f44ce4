"""Running both sides: ONNX Runtime with every compared tensor kept, PyTorch with hooks, the float64 reruns.

* ONNX: the tensors to compare are added to the graph's outputs in memory (the
  file is not touched) and ONNX Runtime runs once with graph optimisation off,
  so every one of them exists.
* PyTorch: forward hooks on the modules, one run; outputs and inputs are cloned
  at hook time because the optimized form mutates tensors in place afterwards
  (a residual ``add_``, the final ``sigmoid_``).
* The local reference: the faithful model built from the file, in float64 on
  the CPU, rerun from each layer's device input.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from modnet_npu.runtime.engines import ort_session


def run_onnx(model: onnx.ModelProto, names: Iterable[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor in ``names``, from one ONNX Runtime CPU run with graph optimisation off."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)  # in memory only: the file on disk is never changed
    present = {o.name for o in extended.graph.output}
    wanted = list(dict.fromkeys(names))
    extended.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted if n not in present)
    # no fusion or constant folding, so every intermediate tensor named here still exists
    session = ort_session(extended.SerializeToString(), optimization="none")
    feed = session.get_inputs()[0]
    dtype = np.float16 if feed.type == "tensor(float16)" else np.float32
    out_names = [o.name for o in session.get_outputs()]
    values = session.run(out_names, {feed.name: x.astype(dtype)})
    return {n: np.asarray(v) for n, v in zip(out_names, values)}


@dataclass
class Capture:
    outputs: dict[str, torch.Tensor]  # module name ("" for the model's output) -> output
    inputs: dict[str, torch.Tensor]  # module name -> first positional input
    order: dict[str, int]  # module name -> when its output was complete


def _clone(t: object) -> torch.Tensor | None:
    return t.detach().clone() if isinstance(t, torch.Tensor) else None


def run_torch(model: nn.Module, x: torch.Tensor, out_modules: set[str], in_modules: set[str]) -> Capture:
    """One forward with hooks; tensors are cloned when seen, before any later in-place op changes them."""
    cap = Capture({}, {}, {})
    hooks = []

    def on_output(name: str) -> Callable:
        def hook(_module, _inputs, output) -> None:
            if name not in cap.outputs:
                cap.outputs[name] = _clone(output)
                cap.order[name] = len(cap.order)
        return hook

    def on_input(name: str) -> Callable:
        def hook(_module, inputs) -> None:
            if name not in cap.inputs and inputs:
                cap.inputs[name] = _clone(inputs[0])
        return hook

    try:
        for name in out_modules:
            hooks.append(model.get_submodule(name).register_forward_hook(on_output(name)))
        for name in in_modules:
            hooks.append(model.get_submodule(name).register_forward_pre_hook(on_input(name)))
        with torch.inference_mode():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    cap.outputs[""] = y.detach().clone()
    cap.order[""] = len(cap.order)
    return cap


class DepthwiseConv64(nn.Module):
    """A depthwise convolution as a sum of shifted views times per-channel weights.

    Same function as the ``nn.Conv2d`` it replaces, for the float64 reference
    only: PyTorch's float64 CPU convolution has no vectorised depthwise kernel and
    takes ~40x longer than this, which made depthwise layers most of the cost.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = conv.weight.detach()[:, 0]  # (C, kh, kw)
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (sh, sw), (ph, pw), (kh, kw) = self.stride, self.padding, self.weight.shape[1:]
        xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
        ho, wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
        out = torch.zeros(x.shape[0], x.shape[1], ho, wo, dtype=x.dtype, device=x.device)
        for i in range(kh):
            for j in range(kw):
                view = xp[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
                out.addcmul_(view, self.weight[:, i, j].view(1, -1, 1, 1))
        return out if self.bias is None else out.add_(self.bias.view(1, -1, 1, 1))


def with_fast_depthwise(model: nn.Module) -> nn.Module:
    """``model`` with every depthwise Conv2d replaced, in place, by :class:`DepthwiseConv64`."""
    for name, module in list(model.named_modules()):
        depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels
        if depthwise and module.groups > 1:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, DepthwiseConv64(module))
    return model


def local_reference(reference: nn.Module, chain: Sequence[str], sigmoid: bool, x: torch.Tensor) -> torch.Tensor:
    """The chain of reference modules (float64, CPU) applied to the device's input."""
    y = x.detach().to("cpu", torch.float64)
    with torch.inference_mode():
        for name in chain:
            y = reference.get_submodule(name)(y)
        return torch.sigmoid(y) if sigmoid else y
