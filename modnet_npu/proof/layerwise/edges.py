"""The ONNX side: from a unit's node, following edges to the tensor equal to its output.

The converter says which ONNX node carries which MODNet unit. From that node
the graph's *edges* (never names: exporters rename and shuffle) are followed
forward through the ops the unit's own norm and activation export to, up to the
one tensor equal to the unit's output. All of it reads the file's one
:class:`~modnet_npu.graph.index.GraphIndex`.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from modnet_npu.conversion.convert import OnnxUnit
from modnet_npu.graph.index import GraphIndex, attr, data_inputs, node_name
from modnet_npu.model.modnet import IBNorm, MODNet
from modnet_npu.proof.layerwise.plan import Boundary, unit_chain

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


def tail(index: GraphIndex, image: str, start: str, ops: set[str]) -> tuple[str | None, str]:
    """The tensor ending the run of ``ops`` nodes fed by ``start`` alone (plus constants).

    Returns (tensor, "") or (None, reason). A node joins the run when its op
    is allowed and every data input that depends on ``image`` is already in it.
    """
    image_dependent = index.flows_from(image)
    inside, todo, members = {start}, [start], set()
    while todo:
        for node in index.consumers(todo.pop()):
            if id(node) in members or node.op_type not in ops:
                continue
            data = [n for n in data_inputs(node) if n in image_dependent]
            if all(n in inside for n in data):
                members.add(id(node))
                new = [o for o in node.output if o and o not in inside]
                inside.update(new)
                todo.extend(new)
    # an end is read by nodes outside the run (or is a graph output); unread side outputs don't count
    ends = [t for t in inside if (index.consumers(t) or t in index.outputs)
            and not any(id(c) in members for c in index.consumers(t))]
    if len(ends) != 1:
        return None, f"the ops after {start!r} end in {len(ends)} tensors, not one"
    return ends[0], ""


def unit_tensor(index: GraphIndex, image: str, unit: OnnxUnit, ops: set[str]) -> tuple[str | None, str]:
    """The ONNX tensor equal to a unit's output (after its norm and activation), or (None, reason)."""
    node = unit.bn_node or unit.node
    if unit.node.op_type == "FusedConv":
        if unit.extra_inputs:
            return None, f"ONNX node {node_name(unit.node)!r} fuses the residual add into the conv"
        act = attr(unit.node, "activation", "")
        if act and act not in ops:
            return None, f"ONNX node {node_name(unit.node)!r} fuses a {act} the layer does not have"
    return tail(index, image, node.output[0], ops)


def residual_tensor(index: GraphIndex, unit: OnnxUnit, unit_out: str | None) -> tuple[str | None, str]:
    """The output of a residual block: its projection unit's output plus the block input."""
    if unit.node.op_type == "FusedConv" and unit.extra_inputs:
        return unit.node.output[0], ""  # ONNX Runtime fused the add: the conv's output is the block's
    if unit_out is None:
        return None, "the block's last unit has no ONNX tensor"
    adds = [n for n in index.consumers(unit_out) if n.op_type in ("Add", "Sum")]
    if len(adds) != 1:
        return None, f"{len(adds)} Add nodes read {unit_out!r}, expected the residual add alone"
    return adds[0].output[0], ""


def onnx_tensors(
    index: GraphIndex, image: str, faithful: MODNet, plan_: Sequence[Boundary], mapping: dict[str, OnnxUnit]
) -> dict[str, tuple[str | None, str]]:
    """Row name -> (ONNX tensor, "") or (None, reason why ONNX has no equal tensor)."""
    found: dict[str, tuple[str | None, str]] = {}
    for b in plan_:
        if b.out_module is None:
            found[b.layer] = (index.outputs[0], "")
            continue
        unit = mapping[b.unit]
        got = found.get(b.unit) or unit_tensor(index, image, unit, tail_ops(faithful, unit_chain(faithful, b.unit)))
        if b.residual:
            got = residual_tensor(index, unit, got[0])
        found[b.layer] = got
    return found
