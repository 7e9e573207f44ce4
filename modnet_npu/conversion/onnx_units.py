"""Convert a MODNet ONNX file (any exporter, opset, naming or precision) to PyTorch.

How it works, and why this way: exports of the same network differ in tensor
names, node order, constant storage, BatchNorm folding, Linear form and
precision (README, "The converter"), so nothing here relies on names or order.

1. A table of small handlers keyed by op type turns each weight-carrying node
   (Conv, BatchNormalization, MatMul/Gemm) into a *unit* with a structural
   label (kind, channels, kernel, stride, groups) and checks parameter-free ones
   (InstanceNormalization must have scale 1 and bias 0). A BatchNorm that reads a
   Conv's output directly is merged into that Conv's unit, whether the exporter
   folded it or not.
2. Following the graph's edges, each unit gets its *predecessors*: the nearest
   units (or the image input) its data flows from. ``Shape`` cuts the flow, so
   size computations add no false edges.
3. The PyTorch model is traced the same way (on the ``meta`` device, with a
   dispatch mode that follows data through every operator).
4. The two unit graphs are matched in execution order: a model unit takes the
   one ONNX unit with its label whose predecessors are the images of its own.
5. Each pair fills the model's tensors; every target is filled exactly once,
   constants no unit used are reported, and the load is ``strict=True``.

Also loads the official PyTorch checkpoints. CLI: ONNX (or .ckpt) -> .pt or
.safetensors state dict.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Sequence, Union

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from modnet_npu.fileio import atomic_path
from modnet_npu.model.modnet import MODNet, MODNetConfig
from modnet_npu.graph.weights import OnnxWeights, read_weights
from modnet_npu.errors import ModnetError

INPUT = "<input>"


class ConversionError(ModnetError, ValueError):
    """The graph cannot be mapped onto MODNet; the message names the op or tensor."""


# --------------------------------------------------------------------------
# ONNX side: units
# --------------------------------------------------------------------------


@dataclass
class OnnxUnit:
    """One weight-carrying layer of the ONNX graph (a Conv possibly with its BatchNorm)."""

    kind: str  # "conv", "bn" or "linear"
    label: Label
    node: onnx.NodeProto
    data_input: str
    tensors: dict[str, np.ndarray]  # role -> value, e.g. "weight", "bias", "bn_mean"
    sources: dict[str, tuple[str, ...]]  # role -> stored constants behind it
    attrs: dict[str, object] = field(default_factory=dict)
    bn_node: onnx.NodeProto | None = None
    preds: frozenset[str] = frozenset()
    uid: str = ""
    extra_inputs: list[str] = field(default_factory=list)  # data the node adds after its weights (FusedConv's Z)

    @property
    def name(self) -> str:
        return _node_name(self.node)


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0]}>"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class ConvLabel(NamedTuple):
    """What a convolution is, structurally: the key both sides are matched on."""

    kind: str  # "conv"
    out_channels: int
    in_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    groups: int


class BnLabel(NamedTuple):
    kind: str  # "bn"
    channels: int


class LinearLabel(NamedTuple):
    kind: str  # "linear"
    in_features: int
    out_features: int


Label = Union[ConvLabel, BnLabel, LinearLabel]


def describe(label: Label) -> str:
    """A label as a person reads it, e.g. 'Conv 1280->96 5x5 stride 1'."""
    if isinstance(label, ConvLabel):
        s = label.stride_h if label.stride_h == label.stride_w else (label.stride_h, label.stride_w)
        grp = f" groups {label.groups}" if label.groups != 1 else ""
        return f"Conv {label.in_channels}->{label.out_channels} {label.kernel_h}x{label.kernel_w} stride {s}{grp}"
    if isinstance(label, BnLabel):
        return f"BatchNorm {label.channels}"
    return f"Linear {label.in_features}->{label.out_features}"


class _Context:
    """What handlers need: constant lookup that fails naming node and tensor."""

    def __init__(self, weights: OnnxWeights) -> None:
        self.weights = weights
        self.claimed: set[str] = set()

    def const(self, node: onnx.NodeProto, index: int, role: str, required: bool = True) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            if required:
                raise ConversionError(f"{node.op_type} node {_node_name(node)!r} has no {role} input")
            return None
        name = node.input[index]
        value = self.weights.resolve(name)
        if value is None:
            raise ConversionError(
                f"{node.op_type} node {_node_name(node)!r}: {role} tensor {name!r} is not a constant"
            )
        if value.dtype != np.float32:
            raise ConversionError(
                f"{node.op_type} node {_node_name(node)!r}: {role} tensor {name!r} has dtype {value.dtype}"
            )
        return value

    def claim(self, node: onnx.NodeProto, indices: Iterable[int]) -> dict[int, tuple[str, ...]]:
        out = {}
        for i in indices:
            if i < len(node.input) and node.input[i]:
                src = self.weights.sources(node.input[i])
                self.claimed.update(src)
                out[i] = src
        return out


Handler = Callable[[onnx.NodeProto, _Context], "OnnxUnit | None"]
HANDLERS: dict[str, Handler] = {}


def handler(*op_types: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for op in op_types:
            if op in HANDLERS:
                raise RuntimeError(f"a handler for {op} is already registered")
            HANDLERS[op] = fn
        return fn

    return register


@handler("Conv", "FusedConv")
def _conv(node: onnx.NodeProto, ctx: _Context) -> OnnxUnit:
    w = ctx.const(node, 1, "weight")
    b = ctx.const(node, 2, "bias", required=False)
    if w.ndim != 4:
        raise ConversionError(f"Conv node {_node_name(node)!r}: weight {node.input[1]!r} is {w.ndim}-D, expected 4-D")
    o, ipg, kh, kw = w.shape
    groups = int(_attr(node, "group", 1))
    sh, sw = (list(_attr(node, "strides", [1, 1])) + [1, 1])[:2]
    dil = list(_attr(node, "dilations", [1, 1]))
    if any(d != 1 for d in dil):
        raise ConversionError(f"Conv node {_node_name(node)!r}: dilations {dil}; MODNet uses none")
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = [int(p) for p in _attr(node, "pads", [0, 0, 0, 0])]
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    else:  # SAME_UPPER / SAME_LOWER on odd kernels: symmetric
        pads = [kh // 2, kw // 2, kh // 2, kw // 2]
    extra: list[str] = []
    if node.op_type == "FusedConv":  # ONNX Runtime's Conv + activation (+ Z, a fused residual add)
        act = _attr(node, "activation", b"")
        act = act.decode() if isinstance(act, bytes) else act
        if act not in ("", "Relu", "Clip", "Sigmoid"):
            raise ConversionError(f"FusedConv node {_node_name(node)!r}: activation {act!r} is not in MODNet")
        extra = [n for n in node.input[3:4] if n]
    if b is not None and b.shape != (o,):
        raise ConversionError(f"Conv node {_node_name(node)!r}: bias {node.input[2]!r} has shape {b.shape}, expected ({o},)")
    src = ctx.claim(node, (1, 2))
    tensors = {"weight": w} | ({"bias": b} if b is not None else {})
    sources = {"weight": src[1]} | ({"bias": src[2]} if 2 in src else {})
    label = ConvLabel("conv", int(o), int(ipg * groups), int(kh), int(kw), int(sh), int(sw), groups)
    return OnnxUnit("conv", label, node, node.input[0], tensors, sources, {"pads": tuple(pads)}, extra_inputs=extra)


@handler("BatchNormalization")
def _batchnorm(node: onnx.NodeProto, ctx: _Context) -> OnnxUnit:
    roles = ("bn_weight", "bn_bias", "bn_mean", "bn_var")
    values = [ctx.const(node, i + 1, r) for i, r in enumerate(roles)]
    c = values[0].shape[0]
    for name, v in zip(node.input[1:5], values):
        if v.shape != (c,):
            raise ConversionError(f"BatchNormalization node {_node_name(node)!r}: {name!r} has shape {v.shape}, expected ({c},)")
    src = ctx.claim(node, range(1, 5))
    unit = OnnxUnit("bn", BnLabel("bn", int(c)), node, node.input[0], dict(zip(roles, values)),
                    {r: src[i + 1] for i, r in enumerate(roles)})
    unit.attrs["eps"] = float(_attr(node, "epsilon", 1e-5))
    return unit


@handler("MatMul")
def _matmul(node: onnx.NodeProto, ctx: _Context) -> OnnxUnit:
    if ctx.weights.resolve(node.input[0]) is not None:
        raise ConversionError(f"MatMul node {_node_name(node)!r}: constant left operand; MODNet's Linear is x @ W^T")
    w = ctx.const(node, 1, "weight")
    if w.ndim != 2:
        raise ConversionError(f"MatMul node {_node_name(node)!r}: weight {node.input[1]!r} is {w.ndim}-D, expected 2-D")
    src = ctx.claim(node, (1,))
    weight = np.ascontiguousarray(w.T)  # ONNX stores (in, out); nn.Linear wants (out, in)
    return OnnxUnit("linear", LinearLabel("linear", int(w.shape[0]), int(w.shape[1])), node, node.input[0],
                    {"weight": weight}, {"weight": src[1]})


@handler("Gemm")
def _gemm(node: onnx.NodeProto, ctx: _Context) -> OnnxUnit:
    if int(_attr(node, "transA", 0)):
        raise ConversionError(f"Gemm node {_node_name(node)!r}: transA=1 is not a Linear layer")
    b = ctx.const(node, 1, "weight")
    weight = b if int(_attr(node, "transB", 0)) else np.ascontiguousarray(b.T)
    weight = weight * np.float32(_attr(node, "alpha", 1.0))
    bias = ctx.const(node, 2, "bias", required=False)
    if bias is not None and np.any(bias * np.float32(_attr(node, "beta", 1.0)) != 0):
        raise ConversionError(
            f"Gemm node {_node_name(node)!r}: bias {node.input[2]!r} is non-zero; MODNet's Linear layers have none"
        )
    src = ctx.claim(node, (1, 2))
    out_f, in_f = weight.shape
    return OnnxUnit("linear", LinearLabel("linear", int(in_f), int(out_f)), node, node.input[0],
                    {"weight": weight}, {"weight": src[1]})


@handler("InstanceNormalization")
def _instance_norm(node: onnx.NodeProto, ctx: _Context) -> None:
    scale = ctx.const(node, 1, "scale")
    bias = ctx.const(node, 2, "bias")
    if np.any(scale != 1) or np.any(bias != 0):
        raise ConversionError(
            f"InstanceNormalization node {_node_name(node)!r}: affine scale/bias "
            f"({node.input[1]!r}, {node.input[2]!r}); MODNet's InstanceNorm has none"
        )
    eps = float(_attr(node, "epsilon", 1e-5))
    if abs(eps - 1e-5) > 1e-9:
        raise ConversionError(f"InstanceNormalization node {_node_name(node)!r}: epsilon {eps}; MODNet uses 1e-5")
    ctx.claim(node, (1, 2))
    return None


# Inputs that carry sizes, axes or bounds rather than image data: they do not
# make one layer a predecessor of another.
DATA_INPUTS: dict[str, tuple[int, ...]] = {
    op: (0,)
    for op in ("Resize", "Upsample", "Clip", "Pad", "Reshape", "Slice", "Expand", "Tile", "Squeeze",
               "Unsqueeze", "Split", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "Gather",
               "ReduceSumSquare", "ReduceL2")
} | {"Shape": (), "Size": (), "ConstantOfShape": ()}


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    positions = DATA_INPUTS.get(node.op_type)
    names = list(node.input) if positions is None else [node.input[i] for i in positions if i < len(node.input)]
    return [n for n in names if n]


@dataclass
class OnnxGraph:
    weights: OnnxWeights
    input_name: str
    output_name: str
    units: list[OnnxUnit]
    claimed: set[str]


def _push_producers(node: onnx.NodeProto, known: set[str], producer: dict, state: dict, stack: list) -> None:
    """Queue the producers of ``node``'s inputs that are not done yet."""
    for name in node.input:
        if not name or name in known:
            continue
        if name not in producer:
            raise ConversionError(
                f"tensor {name!r} used by {node.op_type} node {_node_name(node)!r} is produced by no node"
            )
        dep = producer[name]
        if state.get(id(dep)) == 1:
            raise ConversionError(f"the graph has a cycle through node {_node_name(dep)!r}")
        if state.get(id(dep)) != 2:
            stack.append((dep, False))


def _topological(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every node comes after its inputs' producers (files need not be sorted)."""
    producer = {out: node for node in graph.node for out in node.output if out}
    order, state = [], {}  # state: 1 = on the current path, 2 = done
    for root in graph.node:
        stack = [(root, False)] if id(root) not in state else []
        while stack:
            node, done = stack.pop()
            if done:
                state[id(node)] = 2
                order.append(node)
            elif state.get(id(node)) != 2:
                if state.get(id(node)) == 1:
                    raise ConversionError(f"the graph has a cycle through node {_node_name(node)!r}")
                state[id(node)] = 1
                stack.append((node, True))
                _push_producers(node, known, producer, state, stack)
    return order


def _check_contract(facts) -> None:
    """One [N, 3, H, W] image in, one matte out; ConversionError otherwise."""
    images = list(facts.inputs)
    if len(images) != 1:
        names = ", ".join(v.name for v in images) or "none"
        raise ConversionError(f"not a MODNet graph: expected one image input, found {len(images)} ({names})")
    image = images[0]
    if len(image.shape) != 4 or image.shape[1] not in (3, None) and not isinstance(image.shape[1], str):
        raise ConversionError(
            f"not a MODNet graph: input {image.name!r} has shape {list(image.shape)}, expected [N, 3, H, W]"
        )
    if len(facts.outputs) != 1:
        raise ConversionError(f"not a MODNet graph: expected one output, found {len(facts.outputs)}")


def _refuse_hardware_layouts(graph: onnx.GraphProto) -> None:
    layout_ops = sorted({n.op_type for n in graph.node if n.domain == "com.microsoft.nchwc"})
    if layout_ops:
        raise ConversionError(
            f"the graph was saved by ONNX Runtime with hardware-specific layout optimisations "
            f"({', '.join(layout_ops)}); convert the original file, or one saved with ORT_ENABLE_EXTENDED or lower"
        )


def _merge_batchnorms(nodes: Sequence[onnx.NodeProto], units: list[OnnxUnit],
                      unit_of_node: dict[int, OnnxUnit]) -> list[OnnxUnit]:
    """Units with each BatchNorm that reads a Conv's output directly (and alone) merged into the Conv."""
    consumers: dict[str, int] = defaultdict(int)
    for node in nodes:
        for name in node.input:
            consumers[name] += 1
    producer_unit = {u.node.output[0]: u for u in units if u.kind == "conv"}
    merged: list[OnnxUnit] = []
    for unit in units:
        conv = producer_unit.get(unit.data_input) if unit.kind == "bn" else None
        if conv is None or consumers[unit.data_input] != 1 or conv.bn_node is not None:
            merged.append(unit)
            continue
        if unit.label.channels != conv.label.out_channels:
            raise ConversionError(
                f"BatchNormalization node {unit.name!r} has {unit.label.channels} channels after "
                f"Conv node {conv.name!r} with {conv.label.out_channels}"
            )
        conv.bn_node = unit.node
        conv.tensors.update(unit.tensors)
        conv.sources.update(unit.sources)
        conv.attrs.update(unit.attrs)
        unit_of_node[id(unit.node)] = conv
    for i, unit in enumerate(merged):
        unit.uid = f"u{i}"
    return merged


def _link_predecessors(nodes: Sequence[onnx.NodeProto], unit_of_node: dict[int, OnnxUnit], image: str) -> None:
    """Set each unit's predecessors: follow data from the image through parameter-free ops."""
    deps: dict[str, frozenset[str]] = {image: frozenset([INPUT])}
    for node in nodes:
        unit = unit_of_node.get(id(node))
        if unit is not None:
            if node is unit.node:
                unit.preds = deps.get(unit.data_input, frozenset())
            # a merged BatchNorm speaks for its Conv; a fused residual brings its own sources
            out = frozenset([unit.uid]).union(*(deps.get(n, frozenset()) for n in unit.extra_inputs))
        else:
            out = frozenset().union(*(deps.get(n, frozenset()) for n in _data_inputs(node)))
        for name in node.output:
            if name:
                deps[name] = out


def analyse_onnx(weights: OnnxWeights) -> OnnxGraph:
    """Find the weight-carrying units of a graph and their predecessors."""
    graph = weights.model.graph
    facts = weights.facts()
    _check_contract(facts)
    _refuse_hardware_layouts(graph)
    image = facts.inputs[0]
    ctx = _Context(weights)
    nodes = _topological(graph, {image.name} | set(weights.arrays))
    units: list[OnnxUnit] = []
    unit_of_node: dict[int, OnnxUnit] = {}
    for node in nodes:
        fn = HANDLERS.get(node.op_type)
        unit = fn(node, ctx) if fn is not None else None
        if unit is not None:
            units.append(unit)
            unit_of_node[id(node)] = unit
    units = _merge_batchnorms(nodes, units, unit_of_node)
    _link_predecessors(nodes, unit_of_node, image.name)
    return OnnxGraph(weights, image.name, facts.outputs[0].name, units, ctx.claimed)


# --------------------------------------------------------------------------
# PyTorch side: units, by tracing data through a meta-device forward
# --------------------------------------------------------------------------


@dataclass
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


def trace_model_units(cfg: MODNetConfig = MODNetConfig(), size: int = 64) -> list[ModelUnit]:
    """The weight-carrying units of MODNet in execution order, with their predecessors."""
    with torch.device("meta"):
        model = MODNet(cfg).eval()
    tracker = _Provenance()
    names = {m: n for n, m in model.named_modules()}
    produced_by_conv: dict[int, str] = {}
    units: list[ModelUnit] = []
    unit_of: dict[str, ModelUnit] = {}

    def pre(module: nn.Module, inputs: tuple) -> None:
        name = names[module]
        preds = tracker.of(inputs)
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            k, s = module.kernel_size, module.stride
            label = ConvLabel("conv", module.out_channels, module.in_channels, k[0], k[1], s[0], s[1], module.groups)
            unit = ModelUnit("conv", label, name, None, None, preds)
        elif isinstance(module, nn.BatchNorm2d):
            conv = produced_by_conv.get(id(x))
            if conv is not None:  # BatchNorm straight after a Conv: one unit
                unit_of[conv].bn = name
                unit_of[name] = unit_of[conv]
                return
            unit = ModelUnit("bn", BnLabel("bn", module.num_features), None, name, None, preds)
        else:
            unit = ModelUnit("linear", LinearLabel("linear", module.in_features, module.out_features), None, None, name, preds)
        units.append(unit)
        unit_of[name] = unit

    def post(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names[module]
        tracker.set(output, frozenset([unit_of[name].name]))
        if isinstance(module, nn.Conv2d):
            produced_by_conv[id(output)] = name

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    x = torch.empty(1, cfg.in_channels, size, size, device="meta")
    try:
        with tracker:
            tracker.set(x, frozenset([INPUT]))
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return units


# --------------------------------------------------------------------------
# matching and filling
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerMapping:
    module: str  # model unit name (conv, bn or linear module)
    onnx_nodes: tuple[str, ...]
    onnx_tensors: tuple[str, ...]


@dataclass(frozen=True)
class ConversionReport:
    source: str
    opset: int
    input_name: str
    output_name: str
    input_shape: tuple[int | str | None, ...]
    num_units: int
    num_folded_batchnorms: int
    num_source_tensors_used: int
    num_parameters: int
    layers: tuple[LayerMapping, ...]
    synthesized: tuple[str, ...]  # model tensors set to an identity, not read from the file
    leftovers: tuple[tuple[str, tuple[int, ...]], ...]


def match_units(model_units: Sequence[ModelUnit], graph: OnnxGraph) -> dict[str, OnnxUnit]:
    """Pair each model unit with its ONNX unit; ConversionError naming the first that cannot be placed."""
    onnx_units = graph.units
    want = defaultdict(int)
    have = defaultdict(int)
    for u in model_units:
        want[u.kind] += 1
    for u in onnx_units:
        have[u.kind] += 1
    if want["conv"] != have["conv"] or want["linear"] != have["linear"]:
        raise ConversionError(
            f"not a MODNet graph: it has {have['conv']} convolutions and {have['linear']} linear layers; "
            f"MODNet has {want['conv']} and {want['linear']}"
        )
    mapping: dict[str, OnnxUnit] = {}  # model unit name -> onnx unit
    uid_of: dict[str, str] = {INPUT: INPUT}  # model unit name -> onnx uid
    taken: set[int] = set()
    by_label: dict[tuple, list[OnnxUnit]] = defaultdict(list)
    for u in onnx_units:
        by_label[u.label].append(u)
    for mu in model_units:
        target = frozenset(uid_of[p] for p in mu.preds)
        found = [u for u in by_label.get(mu.label, []) if id(u) not in taken and u.preds == target]
        if len(found) == 1:
            chosen = found[0]
        elif not found:
            same_place = [u for u in onnx_units if id(u) not in taken and u.kind == mu.kind and u.preds == target]
            if len(same_place) == 1:
                u = same_place[0]
                raise ConversionError(
                    f"wrong weight shape: {u.node.op_type} node {u.name!r} sits where MODNet has {mu.name} "
                    f"({describe(mu.label)}), but its weight {u.node.input[1]!r} has shape "
                    f"{tuple(u.tensors['weight'].shape)}, making it a {describe(u.label)}"
                )
            raise ConversionError(
                f"cannot place MODNet layer {mu.name} ({describe(mu.label)}): no matching node "
                f"fed by the same layers in the graph"
            )
        else:
            raise ConversionError(
                f"cannot place MODNet layer {mu.name}: {len(found)} nodes fit "
                f"({', '.join(u.name for u in found[:3])})"
            )
        taken.add(id(chosen))
        mapping[mu.name] = chosen
        uid_of[mu.name] = chosen.uid
    extra = [u for u in onnx_units if id(u) not in taken]
    if extra:
        u = extra[0]
        raise ConversionError(
            f"the graph has {len(extra)} layer(s) MODNet does not, first {u.node.op_type} node {u.name!r} "
            f"({describe(u.label)})"
        )
    return mapping


class _Filler:
    """Fills a state dict, each key exactly once, shapes checked."""

    def __init__(self, reference: dict[str, torch.Tensor]) -> None:
        self.reference = reference
        self.values: dict[str, torch.Tensor] = {}
        self.synthesized: list[str] = []

    def put(self, key: str, value: np.ndarray, origin: str) -> None:
        if key not in self.reference:
            raise ConversionError(f"internal: model has no tensor {key}")
        if key in self.values:
            raise ConversionError(f"{key} would be filled twice (second time from {origin})")
        want = tuple(self.reference[key].shape)
        if tuple(value.shape) != want:
            raise ConversionError(f"{origin} has shape {tuple(value.shape)}; {key} needs {want}")
        self.values[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).clone()

    def synth(self, key: str, value: np.ndarray, why: str) -> None:
        self.put(key, value, why)
        self.synthesized.append(f"{key}: {why}")

    def missing(self) -> list[str]:
        return [k for k in self.reference if k not in self.values]


def _identity_var(eps: float) -> np.ndarray:
    """A running variance v with v + eps == 1 exactly in float32, so the BatchNorm is x + bias."""
    v = np.float32(1.0) - np.float32(eps)
    while np.float32(v + np.float32(eps)) != np.float32(1.0):
        v = np.nextafter(v, np.float32(2.0) if v + np.float32(eps) < 1 else np.float32(0.0))
    return v


def _fill_bn(f: _Filler, prefix: str, u: OnnxUnit, model_eps: float, conv_bias: np.ndarray | None) -> None:
    t = u.tensors
    nodes = f"{(u.bn_node or u.node).op_type} node {_node_name(u.bn_node or u.node)!r}"
    var = t["bn_var"] + np.float32(u.attrs.get("eps", 1e-5) - model_eps)
    if np.any(var <= 0):
        raise ConversionError(f"{nodes}: variance not positive after matching epsilon")
    mean = t["bn_mean"] - (conv_bias if conv_bias is not None else 0)  # BN(x + c) = BN'(x)
    f.put(prefix + ".weight", t["bn_weight"], nodes)
    f.put(prefix + ".bias", t["bn_bias"], nodes)
    f.put(prefix + ".running_mean", mean.astype(np.float32), nodes)
    f.put(prefix + ".running_var", var.astype(np.float32), nodes)


def fill_state_dict(model: MODNet, model_units: Sequence[ModelUnit], mapping: dict[str, OnnxUnit]) -> _Filler:
    reference = model.state_dict()
    f = _Filler(reference)
    modules = dict(model.named_modules())
    for mu in model_units:
        u = mapping[mu.name]
        where = f"{u.node.op_type} node {u.name!r}"
        if mu.kind == "linear":
            f.put(mu.linear + ".weight", u.tensors["weight"], where)
            continue
        if mu.kind == "bn":
            _fill_bn(f, mu.bn, u, modules[mu.bn].eps, None)
            f.synth(mu.bn + ".num_batches_tracked", np.zeros((), np.int64), "training counter, unused")
            continue
        conv = modules[mu.conv]
        want = tuple(conv.padding) * 2
        if u.attrs["pads"] != want:
            raise ConversionError(f"{where} pads by {list(u.attrs['pads'])}; MODNet's {mu.conv} pads by {list(want)}")
        f.put(mu.conv + ".weight", u.tensors["weight"], where)
        bias = u.tensors.get("bias")
        if conv.bias is not None:
            if u.bn_node is not None:
                raise ConversionError(f"{where} is followed by BatchNorm where MODNet's {mu.conv} is not")
            if bias is None:
                f.synth(mu.conv + ".bias", np.zeros(conv.out_channels, np.float32), "graph has no bias")
            else:
                f.put(mu.conv + ".bias", bias, where)
            continue
        if mu.bn is None:
            raise ConversionError(f"internal: {mu.conv} has neither bias nor BatchNorm")
        bn = modules[mu.bn]
        if u.bn_node is not None:
            _fill_bn(f, mu.bn, u, bn.eps, bias)
        else:
            # the exporter folded this BatchNorm into the Conv: an identity BN carries the bias
            c = conv.out_channels
            why = f"BatchNorm folded into {where}"
            f.synth(mu.bn + ".weight", np.ones(c, np.float32), why)
            f.put(mu.bn + ".bias", bias if bias is not None else np.zeros(c, np.float32), where)
            f.synth(mu.bn + ".running_mean", np.zeros(c, np.float32), why)
            f.synth(mu.bn + ".running_var", np.full(c, _identity_var(bn.eps), np.float32), why)
        f.synth(mu.bn + ".num_batches_tracked", np.zeros((), np.int64), "training counter, unused")
    missing = f.missing()
    if missing:
        raise ConversionError(f"{len(missing)} model tensor(s) not filled, first {missing[0]}")
    return f


def _leftovers(graph: OnnxGraph) -> list[tuple[str, tuple[int, ...]]]:
    """Stored float tensors (more than one value) that no layer used and that feed data."""
    weights = graph.weights
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in weights.model.graph.node:
        for i, name in enumerate(node.input):
            consumers[name].append((node, i))

    def feeds_data(name: str, depth: int = 0) -> bool:
        uses = consumers.get(name, [])
        if not uses:
            return depth == 0  # a stored weight nothing reads is a leftover too
        for node, i in uses:
            if node.op_type in ("Cast", "Identity", "Transpose"):
                if feeds_data(node.output[0], depth + 1):
                    return True
            elif DATA_INPUTS.get(node.op_type) is None or i in DATA_INPUTS[node.op_type]:
                return True
        return False

    out = []
    for name, info in weights.infos.items():
        if name in graph.claimed or not weights.is_float(name) or info.numel <= 1:
            continue
        if feeds_data(name):
            out.append((name, info.shape))
    return out


@dataclass
class Conversion:
    model: MODNet
    report: ConversionReport


def convert(source: str | os.PathLike[str] | OnnxWeights, cfg: MODNetConfig = MODNetConfig()) -> Conversion:
    """Build a MODNet (CPU, eval mode) holding the weights of an ONNX file."""
    weights = source if isinstance(source, OnnxWeights) else read_weights(source)
    graph = analyse_onnx(weights)
    model_units = trace_model_units(cfg)
    mapping = match_units(model_units, graph)
    model = MODNet(cfg)
    filler = fill_state_dict(model, model_units, mapping)
    model.load_state_dict(filler.values, strict=True)
    model.eval()
    facts = weights.facts()
    layers = tuple(
        LayerMapping(
            mu.name,
            tuple(_node_name(n) for n in (mapping[mu.name].node, mapping[mu.name].bn_node) if n is not None),
            tuple(s for src in mapping[mu.name].sources.values() for s in src),
        )
        for mu in model_units
    )
    report = ConversionReport(
        source=weights.path,
        opset=facts.opset,
        input_name=graph.input_name,
        output_name=graph.output_name,
        input_shape=facts.inputs[0].shape,
        num_units=len(model_units),
        num_folded_batchnorms=sum(1 for mu in model_units if mu.bn and mu.conv and mapping[mu.name].bn_node is None),
        num_source_tensors_used=len(graph.claimed),
        num_parameters=sum(p.numel() for p in model.parameters()),
        layers=layers,
        synthesized=tuple(filler.synthesized),
        leftovers=tuple(_leftovers(graph)),
    )
    return Conversion(model, report)


def build_torch_model_from_onnx(
    path: str | os.PathLike[str], device: str | torch.device | None = None, optimize: bool = True
) -> nn.Module:
    """MODNet with the weights of the ONNX file at ``path``, in eval mode on ``device`` (CPU by default).

    Takes normalised ``[N, 3, H, W]`` float input (H, W multiples of 32) and
    returns ``[N, 1, H, W]`` alpha in [0, 1], whatever size the file was exported at.
    ``optimize=True`` returns the inference form (``inference_form``: BatchNorms
    folded, fewer operators, same outputs to 1e-5); ``False`` the faithful
    module-for-module model.
    """
    model: nn.Module = convert(path).model
    if optimize:
        from modnet_npu.model.optimized import optimize as to_inference_form

        model = to_inference_form(model)
    return model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()


# --------------------------------------------------------------------------
# state dict files
# --------------------------------------------------------------------------

CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors")


def save_state_dict(model: nn.Module, out_path: str) -> None:
    """Write ``model.state_dict()`` as .pt or .safetensors, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_path) as tmp:
        if out_path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, tmp)
        else:
            torch.save(state, tmp)
