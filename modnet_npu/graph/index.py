"""The structure of an ONNX graph, indexed once: who produces and who reads each tensor.

The converter (``modnet_npu.conversion``), the weights reader
(``modnet_npu.graph.weights``) and the layer-by-layer comparison
(``modnet_npu.proof.layerwise``) all walk the graph's edges. They share one
:class:`GraphIndex`, built on first use by ``OnnxWeights.index`` and kept with
the weights (the model is not changed after loading), and the helpers here for
what a single node says: its display name, its attributes, its data inputs.

It knows nothing of MODNet.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import onnx

# Inputs that carry sizes, axes or bounds rather than data, by op type: only the
# positions listed carry data (an empty tuple: none do). An op not listed reads
# data at every input. Size computations (Shape -> Gather -> Concat -> Resize)
# must not make one layer look as if it fed another.
DATA_INPUTS: Mapping[str, tuple[int, ...]] = MappingProxyType({
    op: (0,)
    for op in ("Resize", "Upsample", "Clip", "Pad", "Reshape", "Slice", "Expand", "Tile", "Squeeze",
               "Unsqueeze", "Split", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "Gather",
               "ReduceSumSquare", "ReduceL2")
} | {"Shape": (), "Size": (), "ConstantOfShape": ()})


def node_name(node: onnx.NodeProto) -> str:
    """How a node is named in messages and reports: its own name, else ``<OpType -> first output>``.

    Exporters may leave nodes unnamed; tensor names are unique in a graph, so
    the first output tells an unnamed node apart from every other.
    """
    if node.name:
        return node.name
    out = next((o for o in node.output if o), "")
    return f"<{node.op_type} -> {out}>" if out else f"<{node.op_type}>"


def _decoded(value: object) -> object:
    # ONNX stores STRING attributes as bytes; callers compare them with str
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """Attribute ``name`` of ``node`` as a Python value (strings as ``str``), or ``default`` if absent."""
    for a in node.attribute:
        if a.name == name:
            return _decoded(onnx.helper.get_attribute_value(a))
    return default


def is_data_input(node: onnx.NodeProto, position: int) -> bool:
    """Whether input ``position`` of ``node`` carries data (not a size, axis or bound)."""
    positions = DATA_INPUTS.get(node.op_type)
    return positions is None or position in positions


def data_inputs(node: onnx.NodeProto) -> list[str]:
    """The names of the inputs of ``node`` that carry data, omitted optional inputs left out."""
    return [name for i, name in enumerate(node.input) if name and is_data_input(node, i)]


class GraphIndex:
    """Producers and consumers of every tensor of one ONNX graph (its top level; sub-graphs are not entered)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes: tuple[onnx.NodeProto, ...] = tuple(graph.node)
        self.outputs: tuple[str, ...] = tuple(o.name for o in graph.output)
        self._producers: dict[str, onnx.NodeProto] = {}
        uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self._producers[out] = node
            for i, name in enumerate(node.input):
                if name:
                    uses.setdefault(name, []).append((node, i))
        self._uses = {name: tuple(u) for name, u in uses.items()}
        self._flows: dict[str, frozenset[str]] = {}

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        """The node whose output ``tensor`` is; None for graph inputs, initializers and unknown names."""
        return self._producers.get(tensor)

    def produced(self, tensor: str) -> bool:
        return tensor in self._producers

    def uses(self, tensor: str) -> tuple[tuple[onnx.NodeProto, int], ...]:
        """Every (node, input position) reading ``tensor``, in graph order; a node reading it twice is here twice."""
        return self._uses.get(tensor, ())

    def consumers(self, tensor: str) -> tuple[onnx.NodeProto, ...]:
        """The nodes reading ``tensor``, one entry per input that reads it."""
        return tuple(node for node, _ in self.uses(tensor))

    def display_name(self, tensor: str) -> str:
        """The display name of the node producing ``tensor``, or the tensor's own name if no node does."""
        node = self.producer(tensor)
        return node_name(node) if node is not None else tensor

    def flows_from(self, source: str) -> frozenset[str]:
        """Every tensor whose data flows from ``source`` (itself included), through data inputs only.

        ``Shape`` and friends cut the flow, so a size computed from an image is
        a constant as far as this is concerned. Computed once per source.
        """
        if source not in self._flows:
            found, todo = {source}, [source]
            while todo:
                for node, i in self.uses(todo.pop()):
                    if not is_data_input(node, i):
                        continue
                    for out in node.output:
                        if out and out not in found:
                            found.add(out)
                            todo.append(out)
            self._flows[source] = frozenset(found)
        return self._flows[source]
