"""Matching the two sides and filling the model.

The model's units and the graph's are matched in execution order: a model unit
takes the one ONNX unit with its label whose predecessors are the images of its
own. Each pair then fills the model's tensors; every target is filled exactly
once, and constants no unit used are reported as leftovers.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from modnet_npu.conversion.labels import INPUT, ConversionError, describe
from modnet_npu.conversion.onnx_units import OnnxGraph, OnnxUnit
from modnet_npu.conversion.trace import ModelUnit
from modnet_npu.graph.index import is_data_input, node_name
from modnet_npu.model.modnet import MODNet


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
    nodes = f"{(u.bn_node or u.node).op_type} node {node_name(u.bn_node or u.node)!r}"
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


def leftovers(graph: OnnxGraph) -> list[tuple[str, tuple[int, ...]]]:
    """Stored float tensors (more than one value) that no layer used and that feed data."""
    weights, index = graph.weights, graph.weights.index

    def feeds_data(name: str, depth: int = 0) -> bool:
        uses = index.uses(name)
        if not uses:
            return depth == 0  # a stored weight nothing reads is a leftover too
        for node, i in uses:
            if node.op_type in ("Cast", "Identity", "Transpose"):
                if feeds_data(node.output[0], depth + 1):
                    return True
            elif is_data_input(node, i):
                return True
        return False

    out = []
    for name, info in weights.infos.items():
        if name in graph.claimed or not weights.is_float(name) or info.numel <= 1:
            continue
        if feeds_data(name):
            out.append((name, info.shape))
    return out
