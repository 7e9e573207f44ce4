"""The ONNX side of the conversion: a graph's weight-carrying units and their predecessors.

1. A table of small handlers keyed by op type (:data:`HANDLERS`) turns each
   weight-carrying node (Conv, BatchNormalization, MatMul/Gemm) into a *unit*
   with a structural label (kind, channels, kernel, stride, groups) and checks
   parameter-free ones (InstanceNormalization must have scale 1 and bias 0). A
   BatchNorm that reads a Conv's output directly is merged into that Conv's
   unit, whether the exporter folded it or not.
2. Following the graph's edges (the weights' one :class:`GraphIndex`), each
   unit gets its *predecessors*: the nearest units (or the image input) its data
   flows from. ``Shape`` cuts the flow, so size computations add no false edges.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from modnet_npu.conversion.labels import INPUT, BnLabel, ConversionError, ConvLabel, Label, LinearLabel
from modnet_npu.graph.index import DATA_INPUTS, GraphIndex, attr, data_inputs, node_name
from modnet_npu.graph.weights import OnnxWeights

__all__ = ["DATA_INPUTS", "HANDLERS", "OnnxGraph", "OnnxUnit", "analyse_onnx", "handler"]  # DATA_INPUTS: old home



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
        return node_name(self.node)



class _Context:
    """What handlers need: constant lookup that fails naming node and tensor."""

    def __init__(self, weights: OnnxWeights) -> None:
        self.weights = weights
        self.claimed: set[str] = set()

    def const(self, node: onnx.NodeProto, index: int, role: str, required: bool = True) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            if required:
                raise ConversionError(f"{node.op_type} node {node_name(node)!r} has no {role} input")
            return None
        name = node.input[index]
        value = self.weights.resolve(name)
        if value is None:
            raise ConversionError(
                f"{node.op_type} node {node_name(node)!r}: {role} tensor {name!r} is not a constant"
            )
        if value.dtype != np.float32:
            raise ConversionError(
                f"{node.op_type} node {node_name(node)!r}: {role} tensor {name!r} has dtype {value.dtype}"
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
        raise ConversionError(f"Conv node {node_name(node)!r}: weight {node.input[1]!r} is {w.ndim}-D, expected 4-D")
    o, ipg, kh, kw = w.shape
    groups = int(attr(node, "group", 1))
    sh, sw = (list(attr(node, "strides", [1, 1])) + [1, 1])[:2]
    dil = list(attr(node, "dilations", [1, 1]))
    if any(d != 1 for d in dil):
        raise ConversionError(f"Conv node {node_name(node)!r}: dilations {dil}; MODNet uses none")
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = [int(p) for p in attr(node, "pads", [0, 0, 0, 0])]
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    else:  # SAME_UPPER / SAME_LOWER on odd kernels: symmetric
        pads = [kh // 2, kw // 2, kh // 2, kw // 2]
    extra: list[str] = []
    if node.op_type == "FusedConv":  # ONNX Runtime's Conv + activation (+ Z, a fused residual add)
        act = attr(node, "activation", "")
        if act not in ("", "Relu", "Clip", "Sigmoid"):
            raise ConversionError(f"FusedConv node {node_name(node)!r}: activation {act!r} is not in MODNet")
        extra = [n for n in node.input[3:4] if n]
    if b is not None and b.shape != (o,):
        raise ConversionError(f"Conv node {node_name(node)!r}: bias {node.input[2]!r} has shape {b.shape}, expected ({o},)")
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
            raise ConversionError(f"BatchNormalization node {node_name(node)!r}: {name!r} has shape {v.shape}, expected ({c},)")
    src = ctx.claim(node, range(1, 5))
    unit = OnnxUnit("bn", BnLabel("bn", int(c)), node, node.input[0], dict(zip(roles, values)),
                    {r: src[i + 1] for i, r in enumerate(roles)})
    unit.attrs["eps"] = float(attr(node, "epsilon", 1e-5))
    return unit


@handler("MatMul")
def _matmul(node: onnx.NodeProto, ctx: _Context) -> OnnxUnit:
    if ctx.weights.resolve(node.input[0]) is not None:
        raise ConversionError(f"MatMul node {node_name(node)!r}: constant left operand; MODNet's Linear is x @ W^T")
    w = ctx.const(node, 1, "weight")
    if w.ndim != 2:
        raise ConversionError(f"MatMul node {node_name(node)!r}: weight {node.input[1]!r} is {w.ndim}-D, expected 2-D")
    src = ctx.claim(node, (1,))
    weight = np.ascontiguousarray(w.T)  # ONNX stores (in, out); nn.Linear wants (out, in)
    return OnnxUnit("linear", LinearLabel("linear", int(w.shape[0]), int(w.shape[1])), node, node.input[0],
                    {"weight": weight}, {"weight": src[1]})


@handler("Gemm")
def _gemm(node: onnx.NodeProto, ctx: _Context) -> OnnxUnit:
    if int(attr(node, "transA", 0)):
        raise ConversionError(f"Gemm node {node_name(node)!r}: transA=1 is not a Linear layer")
    b = ctx.const(node, 1, "weight")
    weight = b if int(attr(node, "transB", 0)) else np.ascontiguousarray(b.T)
    weight = weight * np.float32(attr(node, "alpha", 1.0))
    bias = ctx.const(node, 2, "bias", required=False)
    if bias is not None and np.any(bias * np.float32(attr(node, "beta", 1.0)) != 0):
        raise ConversionError(
            f"Gemm node {node_name(node)!r}: bias {node.input[2]!r} is non-zero; MODNet's Linear layers have none"
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
            f"InstanceNormalization node {node_name(node)!r}: affine scale/bias "
            f"({node.input[1]!r}, {node.input[2]!r}); MODNet's InstanceNorm has none"
        )
    eps = float(attr(node, "epsilon", 1e-5))
    if abs(eps - 1e-5) > 1e-9:
        raise ConversionError(f"InstanceNormalization node {node_name(node)!r}: epsilon {eps}; MODNet uses 1e-5")
    ctx.claim(node, (1, 2))
    return None



@dataclass
class OnnxGraph:
    weights: OnnxWeights
    input_name: str
    output_name: str
    units: list[OnnxUnit]
    claimed: set[str]


def _push_producers(node: onnx.NodeProto, known: set[str], index: GraphIndex, state: dict, stack: list) -> None:
    """Queue the producers of ``node``'s inputs that are not done yet."""
    for name in node.input:
        if not name or name in known:
            continue
        dep = index.producer(name)
        if dep is None:
            raise ConversionError(
                f"tensor {name!r} used by {node.op_type} node {node_name(node)!r} is produced by no node"
            )
        if state.get(id(dep)) == 1:
            raise ConversionError(f"the graph has a cycle through node {node_name(dep)!r}")
        if state.get(id(dep)) != 2:
            stack.append((dep, False))


def _topological(index: GraphIndex, known: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every node comes after its inputs' producers (files need not be sorted)."""
    order, state = [], {}  # state: 1 = on the current path, 2 = done
    for root in index.nodes:
        stack = [(root, False)] if id(root) not in state else []
        while stack:
            node, done = stack.pop()
            if done:
                state[id(node)] = 2
                order.append(node)
            elif state.get(id(node)) != 2:
                if state.get(id(node)) == 1:
                    raise ConversionError(f"the graph has a cycle through node {node_name(node)!r}")
                state[id(node)] = 1
                stack.append((node, True))
                _push_producers(node, known, index, state, stack)
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


def _merge_batchnorms(index: GraphIndex, units: list[OnnxUnit], unit_of_node: dict[int, OnnxUnit]) -> list[OnnxUnit]:
    """Units with each BatchNorm that reads a Conv's output directly (and alone) merged into the Conv."""
    producer_unit = {u.node.output[0]: u for u in units if u.kind == "conv"}
    merged: list[OnnxUnit] = []
    for unit in units:
        conv = producer_unit.get(unit.data_input) if unit.kind == "bn" else None
        if conv is None or len(index.uses(unit.data_input)) != 1 or conv.bn_node is not None:
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
            out = frozenset().union(*(deps.get(n, frozenset()) for n in data_inputs(node)))
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
    nodes = _topological(weights.index, {image.name} | set(weights.arrays))
    units: list[OnnxUnit] = []
    unit_of_node: dict[int, OnnxUnit] = {}
    for node in nodes:
        fn = HANDLERS.get(node.op_type)
        unit = fn(node, ctx) if fn is not None else None
        if unit is not None:
            units.append(unit)
            unit_of_node[id(node)] = unit
    units = _merge_batchnorms(weights.index, units, unit_of_node)
    _link_predecessors(nodes, unit_of_node, image.name)
    return OnnxGraph(weights, image.name, facts.outputs[0].name, units, ctx.claimed)

