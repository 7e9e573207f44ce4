"""Layer-by-layer parity: PyTorch MODNet (either form, any device, any precision)
against ONNX Runtime on the CPU, at every boundary where both hold the same tensor.

A matte-level error says *that* the port is wrong, not *where*. This module
compares, in execution order,

* every converted unit's output (a Conv or Linear with its norm and activation),
* the backbone stages enc2x, enc4x, enc8x, enc16x, enc32x (the official backbone's split),
* the branch outputs lr8x (``lr_branch``), hr2x (``hr_branch``), the fusion
  logits (``f_branch.conv_f``) and the matte,

and gives each row a *local* error besides the inherited one, so a layer that
introduces error is told apart from one that only passes it on.

Where the tensors come from:

* ONNX: the converter's analysis says which ONNX node carries which MODNet unit.
  From that node the graph's *edges* (never names: exporters rename and shuffle)
  are followed forward through the ops the unit's own norm and activation
  export to, up to the one tensor equal to the unit's output. Those tensors are
  added to the graph's outputs in memory (the file is not touched) and ONNX
  Runtime runs once with graph optimisation off, so every one of them exists.
* PyTorch: forward hooks on the modules, one run; outputs and inputs are cloned
  at hook time because the inference form mutates tensors in place afterwards
  (a residual ``add_``, the final ``sigmoid_``).

The local error of a row is ``max |reference(x_dev) - y_dev|``: the layer's
device input ``x_dev`` (forward pre-hook) is fed to the same layer *as the
ONNX file defines it* — the converter's faithful model built from the file,
cast to float64 on the CPU — and compared with the layer's device output
``y_dev``. Using the file's weights rather than a copy of the device module's
own makes a wrong weight (a conversion fault) show up as local error, not only
device or half-precision rounding. Stage rows take the local error of the
block that produces them, branch rows that of the branch's last unit, the matte
that of ``conv_f``'s last unit plus the sigmoid.

``first_divergence`` is the first row whose relative error (max abs error over
max abs value of the ONNX tensor) exceeds the threshold; ``worst_local`` is the
row with the largest *relative* local error (local max abs over the same
denominator), because layers' magnitudes differ by orders (ReLU6 outputs below
6, enc32x in the tens) and an absolute figure would just point at the largest
activations. Ties go to the earlier row, so a branch row never takes the blame
from the unit that computes the same tensor.
"""
from __future__ import annotations

import copy
import functools
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from torch import nn

from modnet_npu.conversion.convert import (
    DATA_INPUTS,
    ModelUnit,
    OnnxUnit,
    analyse_onnx,
    convert,
    match_units,
    trace_model_units,
)
from modnet_npu.errors import ModnetError
from modnet_npu.fileio import atomic_path
from modnet_npu.model.optimized import FastMODNet
from modnet_npu.model.modnet import IBNorm, MODNet, MODNetConfig, check_input_size
from modnet_npu.model.precision import LAYER_THRESHOLDS  # re-exported: notebooks import it from here
from modnet_npu.graph.weights import OnnxWeights, read_weights

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

_BACKBONE = "backbone.model.features."


class LayerwiseError(ModnetError, ValueError):
    """The input, model or options cannot be compared layer by layer; one line saying why."""


# --------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRow:
    layer: str  # MODNet layer name (official module name), a stage, a branch or "matte"
    onnx_node: str  # the ONNX node producing the compared tensor
    shape: tuple[int, ...]
    max_abs: float  # max |PyTorch - ONNX Runtime|
    mean_abs: float
    rel: float  # max_abs / max |ONNX Runtime tensor|
    cosine: float
    local_max_abs: float  # max |float64 reference of this layer on the device's input - device output|
    local_rel: float  # local_max_abs / max |ONNX Runtime tensor|, comparable with rel


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


@dataclass(frozen=True)
class LayerwiseReport:
    rows: tuple[LayerRow, ...]  # in execution order
    skipped: tuple[tuple[str, str], ...]  # (layer, reason)
    first_divergence: str | None
    worst_local: str | None
    threshold: float
    layers_compared: int

    def to_dict(self) -> dict:
        """JSON-ready: every row, the skipped layers and the two verdicts (non-finite numbers as None)."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["shape"] = list(r.shape)
            rows.append({k: (_finite(v) if isinstance(v, float) else v) for k, v in d.items()})
        return {
            "threshold": self.threshold,
            "layers_compared": self.layers_compared,
            "first_divergence": self.first_divergence,
            "worst_local": self.worst_local,
            "rows": rows,
            "skipped": [{"layer": layer, "reason": reason} for layer, reason in self.skipped],
        }

    def worst_table(self, n: int = 10) -> str:
        """The ``n`` rows with the largest relative error, as a markdown table."""
        worst = sorted(self.rows, key=lambda r: -_severity(r.rel))[: max(n, 0)]
        lines = [
            "| layer | ONNX node | shape | max abs | mean abs | rel | cosine | local max abs |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in worst:
            flag = " **!**" if _severity(r.rel) > self.threshold else ""
            lines.append(
                f"| {r.layer}{flag} | {r.onnx_node} | {'x'.join(map(str, r.shape))} | {r.max_abs:.2e} | "
                f"{r.mean_abs:.2e} | {r.rel:.2e} | {r.cosine:.6f} | {r.local_max_abs:.2e} |"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------
# the plan: which boundaries exist, in faithful module names
# --------------------------------------------------------------------------


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
        block = f"{_BACKBONE}{k}"
        last = [u for u in units if u.startswith(block + ".")][-1]
        residual = bool(getattr(model.get_submodule(block), "use_res_connect", False))
        out.append(Boundary(stage, last, block, (block,), residual=residual))
    for name, module, unit in BRANCHES:
        out.append(Boundary(name, unit, module, chains[unit]))
    last = BRANCHES[-1][2]
    out.append(Boundary(MATTE, "", None, chains[last], sigmoid=True))
    return out


# --------------------------------------------------------------------------
# the device model's forms
# --------------------------------------------------------------------------


def fast_module_name(faithful: MODNet, name: str) -> str:
    """The ``FastMODNet`` module computing what faithful module ``name`` (a unit or a block) does.

    ``FastMODNet`` keeps one module per unit: backbone blocks under ``enc2x``,
    ``enc4x``, ``enc32x`` (features 0-1, 2-3, 4-18), a block's convs renumbered
    under ``layers``, and each branch's Conv2dIBNormRelu by its own name.
    """
    if name.startswith(_BACKBONE):
        parts = name[len(_BACKBONE):].split(".")
        k = int(parts[0])
        block = f"enc2x.{k}" if k < 2 else f"enc4x.{k - 2}" if k < 4 else f"enc32x.{k - 4}"
        if len(parts) == 1:
            return block
        seq_name = name.rpartition(".")[0]
        seq = faithful.get_submodule(seq_name)
        nth = sum(isinstance(m, nn.Conv2d) for m in list(seq)[: int(parts[-1])])
        return f"{block}.layers.{nth}" if parts[1] == "conv" else f"{block}.{nth}"
    if name.startswith("lr_branch.se_block."):
        raise LayerwiseError(f"{name}: FastMODNet applies its activation in forward, after the module")
    if name.endswith(".layers.0") and name.split(".")[0] in ("lr_branch", "hr_branch", "f_branch"):
        return name.split(".", 1)[1][: -len(".layers.0")]
    raise LayerwiseError(f"{name}: FastMODNet has no module of its own for it")


@dataclass(frozen=True)
class Taps:
    """Where to hook the device model for one boundary."""

    out_module: str | None  # None: the model's output
    in_module: str


def device_taps(model: nn.Module, faithful: MODNet, b: Boundary) -> Taps:
    """The device model's modules for boundary ``b``; LayerwiseError with the reason when it has none."""
    if not isinstance(model, FastMODNet):
        return Taps(b.out_module, b.chain[0])
    first = b.chain[0]
    in_module = fast_module_name(faithful, first)
    if b.out_module is None:
        return Taps(None, in_module)
    # a stage is its block's output; a unit and a branch are the (last) unit's module output
    out = fast_module_name(faithful, b.out_module if b.layer in STAGES else b.unit)
    if isinstance(faithful.get_submodule(first), nn.Conv2d):
        dev, ref = model.get_submodule(out), faithful.get_submodule(first)
        if dev.conv.weight.shape != ref.weight.shape:
            raise LayerwiseError(
                f"{out} has weight {tuple(dev.conv.weight.shape)}; {first} has {tuple(ref.weight.shape)}"
            )
    return Taps(out, in_module)


def _input_dtype(model: nn.Module) -> torch.dtype:
    # FastMODNet keeps its backbone in float32 and takes float32 input at any precision
    if isinstance(model, FastMODNet):
        return torch.float32
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------
# ONNX side: following edges from a unit's node to its output tensor
# --------------------------------------------------------------------------

_ALWAYS = {"Cast", "Identity"}
# what each PyTorch norm or activation exports to, across exporters and opsets
# (InstanceNorm as InstanceNormalization or as mean/variance ops)
_IBNORM_OPS = {"Slice", "Split", "BatchNormalization", "InstanceNormalization", "Concat", "ReduceMean",
               "ReduceSum", "ReduceSumSquare", "Sub", "Mul", "Div", "Add", "Pow", "Sqrt", "Reciprocal",
               "Reshape", "Expand", "Squeeze", "Unsqueeze", "Neg"}
_MODULE_OPS: tuple[tuple[type, set[str]], ...] = (
    (nn.BatchNorm2d, {"BatchNormalization"}),
    (nn.ReLU6, {"Clip", "Relu", "Min", "Max"}),
    (nn.ReLU, {"Relu"}),
    (nn.Sigmoid, {"Sigmoid"}),
    (IBNorm, _IBNORM_OPS),
)


def tail_ops(model: MODNet, chain: Sequence[str]) -> set[str]:
    """ONNX op types the norm/activation modules of a unit's chain may export to."""
    ops = set(_ALWAYS)
    for name in chain[1:]:
        module = model.get_submodule(name)
        ops |= next((o for t, o in _MODULE_OPS if isinstance(module, t)), set())
    return ops


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0]}>"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


class OnnxIndex:
    """Producers, consumers and image dependence of an ONNX graph's tensors."""

    def __init__(self, model: onnx.ModelProto, image: str) -> None:
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = [o.name for o in graph.output]
        self.image_dependent = self._depends_on(image)

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        pos = DATA_INPUTS.get(node.op_type)
        names = list(node.input) if pos is None else [node.input[i] for i in pos if i < len(node.input)]
        return [n for n in names if n]

    def _depends_on(self, image: str) -> set[str]:
        # data flow from the image; Shape and friends cut it, so size computations count as constants
        found, todo = {image}, [image]
        while todo:
            for node in self.consumers.get(todo.pop(), []):
                if any(n in found for n in self.data_inputs(node)):
                    for o in node.output:
                        if o and o not in found:
                            found.add(o)
                            todo.append(o)
        return found

    def tail(self, start: str, ops: set[str]) -> tuple[str | None, str]:
        """The tensor ending the run of ``ops`` nodes fed by ``start`` alone (plus constants).

        Returns (tensor, "") or (None, reason). A node joins the run when its op
        is allowed and every image-dependent data input is already in it.
        """
        inside, todo, members = {start}, [start], set()
        while todo:
            for node in self.consumers.get(todo.pop(), []):
                if id(node) in members or node.op_type not in ops:
                    continue
                data = [n for n in self.data_inputs(node) if n in self.image_dependent]
                if all(n in inside for n in data):
                    members.add(id(node))
                    new = [o for o in node.output if o and o not in inside]
                    inside.update(new)
                    todo.extend(new)
        # an end is read by nodes outside the run (or is a graph output); unread side outputs don't count
        ends = [t for t in inside if (self.consumers.get(t) or t in self.outputs)
                and not any(id(c) in members for c in self.consumers.get(t, []))]
        if len(ends) != 1:
            return None, f"the ops after {start!r} end in {len(ends)} tensors, not one"
        return ends[0], ""


def unit_tensor(index: OnnxIndex, unit: OnnxUnit, ops: set[str]) -> tuple[str | None, str]:
    """The ONNX tensor equal to a unit's output (after its norm and activation), or (None, reason)."""
    node = unit.bn_node or unit.node
    if unit.node.op_type == "FusedConv":
        if unit.extra_inputs:
            return None, f"ONNX node {_node_name(unit.node)!r} fuses the residual add into the conv"
        act = _attr(unit.node, "activation", "")
        if act and act not in ops:
            return None, f"ONNX node {_node_name(unit.node)!r} fuses a {act} the layer does not have"
    return index.tail(node.output[0], ops)


def residual_tensor(index: OnnxIndex, unit: OnnxUnit, unit_out: str | None) -> tuple[str | None, str]:
    """The output of a residual block: its projection unit's output plus the block input."""
    if unit.node.op_type == "FusedConv" and unit.extra_inputs:
        return unit.node.output[0], ""  # ONNX Runtime fused the add: the conv's output is the block's
    if unit_out is None:
        return None, "the block's last unit has no ONNX tensor"
    adds = [n for n in index.consumers.get(unit_out, []) if n.op_type in ("Add", "Sum")]
    if len(adds) != 1:
        return None, f"{len(adds)} Add nodes read {unit_out!r}, expected the residual add alone"
    return adds[0].output[0], ""


def onnx_tensors(
    index: OnnxIndex, faithful: MODNet, plan_: Sequence[Boundary], mapping: dict[str, OnnxUnit]
) -> dict[str, tuple[str | None, str]]:
    """Row name -> (ONNX tensor, "") or (None, reason why ONNX has no equal tensor)."""
    found: dict[str, tuple[str | None, str]] = {}
    for b in plan_:
        if b.out_module is None:
            found[b.layer] = (index.outputs[0], "")
            continue
        unit = mapping[b.unit]
        got = found.get(b.unit) or unit_tensor(index, unit, tail_ops(faithful, unit_chain(faithful, b.unit)))
        if b.residual:
            got = residual_tensor(index, unit, got[0])
        found[b.layer] = got
    return found


# --------------------------------------------------------------------------
# running both sides
# --------------------------------------------------------------------------


def run_onnx(model: onnx.ModelProto, names: Iterable[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor in ``names``, from one ONNX Runtime CPU run with graph optimisation off."""
    import onnxruntime as ort

    extended = onnx.ModelProto()
    extended.CopyFrom(model)  # in memory only: the file on disk is never changed
    present = {o.name for o in extended.graph.output}
    wanted = list(dict.fromkeys(names))
    extended.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted if n not in present)
    opts = ort.SessionOptions()
    # no fusion or constant folding, so every intermediate tensor named here still exists
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    # no busy-waiting between ops: this runs beside other work (tests, the device model) on few cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(extended.SerializeToString(), opts, providers=["CPUExecutionProvider"])
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


# --------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def compare_tensors(dev: torch.Tensor, ref: np.ndarray, local: torch.Tensor) -> tuple[float, ...]:
    """(max_abs, mean_abs, rel, cosine, local_max_abs, local_rel) of a device tensor against ORT's.

    The difference of two float32 tensors is taken in float32 (exact to half an
    ulp of the difference); reductions accumulate in float64. Few temporaries:
    at 256x256 these tensors total ~100 MB and fresh memory costs page faults.
    """
    d = dev.detach().to("cpu", torch.float32).reshape(-1)
    r = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(-1)
    diff = (d - r).abs_()
    max_abs, mean_abs = float(diff.max()), float(diff.sum(dtype=torch.float64)) / max(diff.numel(), 1)
    lo, hi = torch.aminmax(r)
    ref_max = max(-float(lo), float(hi))
    nd, nr, nx = (float(torch.linalg.vector_norm(t, dtype=torch.float64)) for t in (d, r, diff))
    # cos = d.r / (|d| |r|) with d.r = (|d|^2 + |r|^2 - |d - r|^2) / 2: no float64 copies of d and r
    cosine = (nd * nd + nr * nr - nx * nx) / (2 * nd * nr) if nd > 0 and nr > 0 else float(nd == nr)
    local_max = float(local.reshape(-1).sub(d).abs_().max())
    return max_abs, mean_abs, _ratio(max_abs, ref_max), min(cosine, 1.0), local_max, _ratio(local_max, ref_max)


def _severity(v: float) -> float:
    # NaN (an overflow in half precision, say) is the worst possible value, not an incomparable one
    return math.inf if math.isnan(v) else v


def _verdicts(rows: Sequence[LayerRow], threshold: float) -> tuple[str | None, str | None]:
    first = next((r.layer for r in rows if _severity(r.rel) > threshold), None)
    worst: LayerRow | None = None
    for r in rows:  # strict > : ties stay with the earlier row
        if worst is None or _severity(r.local_rel) > _severity(worst.local_rel):
            worst = r
    return first, worst.layer if worst else None


def check_input(x: object, in_channels: int) -> np.ndarray:
    """``x`` as float32 numpy [N, C, H, W]; LayerwiseError naming what does not fit."""
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.ndim != 4:
        raise LayerwiseError(f"x must be 4-D [N, {in_channels}, H, W], got shape {list(arr.shape)}")
    if arr.shape[1] != in_channels:
        raise LayerwiseError(f"x must have {in_channels} channels, got shape {list(arr.shape)}")
    if arr.dtype.kind not in "fiu":
        raise LayerwiseError(f"x must hold numbers, got dtype {arr.dtype}")
    try:
        check_input_size(int(arr.shape[2]), int(arr.shape[3]))
    except ValueError as exc:
        raise LayerwiseError(str(exc)) from None
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_onnx_shape(arr: np.ndarray, onnx_shape: Sequence[object]) -> None:
    """LayerwiseError unless ``arr`` fits the file's fixed input sizes (a static export takes one shape)."""
    fixed = [(i, d) for i, d in enumerate(onnx_shape) if isinstance(d, int) and d > 0]
    if len(onnx_shape) != arr.ndim or any(arr.shape[i] != d for i, d in fixed):
        want = [d if isinstance(d, int) else "?" for d in onnx_shape]
        raise LayerwiseError(f"the ONNX file takes input {want}; x has shape {list(arr.shape)}")


def _threshold(threshold: float | None, precision: str) -> float:
    if threshold is not None:
        return float(threshold)
    if precision not in LAYER_THRESHOLDS:
        raise LayerwiseError(f"unknown precision {precision!r}; choose from {', '.join(LAYER_THRESHOLDS)}")
    return LAYER_THRESHOLDS[precision]


@dataclass
class _Setup:
    weights: OnnxWeights
    reference: MODNet  # faithful, float64, CPU, the file's weights
    local: nn.Module  # the same, depthwise convs swapped for DepthwiseConv64: what local reruns use
    index: OnnxIndex
    boundaries: list[Boundary]
    tensors: dict[str, tuple[str | None, str]]


@functools.lru_cache(maxsize=4)
def _model_units(cfg: MODNetConfig) -> tuple[ModelUnit, ...]:
    # a meta-device trace: the same for every file of one config, and a tenth of a second each time
    return tuple(trace_model_units(cfg))


def _setup(path: str | os.PathLike[str], cfg: MODNetConfig, arr: np.ndarray) -> _Setup:
    weights = read_weights(path)
    check_onnx_shape(arr, weights.facts().inputs[0].shape)
    graph = analyse_onnx(weights)
    units = _model_units(cfg)
    mapping = match_units(units, graph)
    reference = convert(weights, cfg).model.double().eval()
    index = OnnxIndex(weights.model, graph.input_name)
    boundaries = plan(reference, [u.name for u in units])
    tensors = onnx_tensors(index, reference, boundaries, mapping)
    # the local reruns get a copy with fast depthwise convs; the original keeps MODNet's structure for mapping
    return _Setup(weights, reference, with_fast_depthwise(copy.deepcopy(reference)), index, boundaries, tensors)


def _tap_all(model: nn.Module, s: _Setup) -> tuple[list[tuple[Boundary, Taps]], list[tuple[str, str]]]:
    taps, skipped = [], []
    for b in s.boundaries:
        tensor, reason = s.tensors[b.layer]
        if tensor is None:
            skipped.append((b.layer, f"no equal ONNX tensor: {reason}"))
            continue
        try:
            taps.append((b, device_taps(model, s.reference, b)))
        except LayerwiseError as exc:
            skipped.append((b.layer, f"no equal boundary in {type(model).__name__}: {exc}"))
    return taps, skipped


def compare_layers(
    onnx_path: str | os.PathLike[str],
    model: nn.Module,
    x: np.ndarray,
    device: str | torch.device | None = None,
    *,
    threshold: float | None = None,
    precision: str = "fp32",
) -> LayerwiseReport:
    """Compare ``model`` (``MODNet`` or ``FastMODNet``, any precision) with ONNX Runtime, layer by layer.

    ``x``: normalised float32 input [N, 3, H, W] (H, W multiples of 32; the
    file's fixed sizes if it has any). ``device``: where the model runs (moved
    there, as ``nn.Module.to`` does); None keeps it where it is. ``threshold``
    on the relative error; None takes ``LAYER_THRESHOLDS[precision]``.
    """
    limit = _threshold(threshold, precision)
    if not isinstance(model, (MODNet, FastMODNet)):
        raise LayerwiseError(f"model must be a MODNet or FastMODNet, got {type(model).__name__}")
    arr = check_input(x, model.cfg.in_channels)
    s = _setup(onnx_path, model.cfg, arr)
    if device is not None:
        model.to(device)
    taps, skipped = _tap_all(model, s)
    ort_out = run_onnx(s.weights.model, (s.tensors[b.layer][0] for b, _ in taps), arr)
    xt = torch.from_numpy(arr).to(_model_device(model), _input_dtype(model))
    cap = run_torch(model.eval(), xt, {t.out_module for _, t in taps if t.out_module}, {t.in_module for _, t in taps})
    rows = _rows(s, taps, cap, ort_out, skipped)
    first, worst = _verdicts(rows, limit)
    return LayerwiseReport(tuple(rows), tuple(skipped), first, worst, limit, len(rows))


def _rows(
    s: _Setup, taps: Sequence[tuple[Boundary, Taps]], cap: Capture, ort_out: dict[str, np.ndarray],
    skipped: list[tuple[str, str]],
) -> list[LayerRow]:
    """One row per boundary, in execution order; a shape mismatch is skipped with its reason."""
    # rows sharing a local rerun (a unit and the branch it ends) are done together, then the
    # float64 tensor is dropped: all of them at once would be twice the activations' memory
    groups: dict[tuple, list[tuple[Boundary, Taps]]] = defaultdict(list)
    for b, t in taps:
        groups[t.in_module, b.chain, b.sigmoid].append((b, t))
    done: dict[str, LayerRow] = {}
    for (in_module, chain, sigmoid), members in groups.items():
        local = local_reference(s.local, chain, sigmoid, cap.inputs[in_module])
        for b, t in members:
            dev, tensor = cap.outputs[t.out_module or ""], s.tensors[b.layer][0]
            ref = ort_out[tensor]
            if ref.size != dev.numel():
                skipped.append((b.layer, f"ONNX tensor {tensor!r} is {list(ref.shape)}, PyTorch's {list(dev.shape)}"))
                continue
            node = _node_name(s.index.producer[tensor]) if tensor in s.index.producer else tensor
            done[b.layer] = LayerRow(b.layer, node, tuple(dev.shape), *compare_tensors(dev, ref, local))
        del local
    order = sorted(taps, key=lambda bt: cap.order[bt[1].out_module or ""])  # stable: units before branches
    return [done[b.layer] for b, _ in order if b.layer in done]


# --------------------------------------------------------------------------
# the figure
# --------------------------------------------------------------------------

_FLOOR = 1e-12  # zero errors drawn here on the log scale


def _short(layer: str) -> str:
    return layer.replace(_BACKBONE, "f.").replace(".layers.0", "")


def layerwise_figure(rep: LayerwiseReport, path: str | os.PathLike[str]) -> None:
    """Relative error per layer (inherited vs ORT, and local) on a log scale, written to ``path`` as PNG.

    Draws on a bare ``Figure`` with the Agg canvas rather than through pyplot:
    it needs no display, and it leaves a notebook's own backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(rep.rows)
    xs = list(range(n))
    fig = Figure(figsize=(max(8.0, 0.16 * n + 3), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, [max(r.rel, _FLOOR) for r in rep.rows], ".-", label="inherited: max|err| / max|ORT| vs ONNX Runtime")
    ax.plot(xs, [max(r.local_rel, _FLOOR) for r in rep.rows], ".-", label="local: float64 rerun on the device's input")
    ax.axhline(rep.threshold, color="red", linestyle="--", label=f"threshold {rep.threshold:g}")
    if rep.first_divergence is not None:
        i = next(i for i, r in enumerate(rep.rows) if r.layer == rep.first_divergence)
        ax.axvline(i, color="black", linewidth=1)
        right = i > 0.6 * n  # keep the label inside the axes
        ax.annotate(f"first divergence: {rep.first_divergence}", (i, rep.threshold), xytext=(-5 if right else 5, 10),
                    textcoords="offset points", fontsize=8, ha="right" if right else "left")
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("relative error (max abs / max |ORT tensor|)")
    step = max(1, math.ceil(n / 60))  # thin the labels so they stay readable
    ax.set_xticks(xs[::step])
    ax.set_xticklabels([_short(r.layer) for r in rep.rows][::step], rotation=90, fontsize=6)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
