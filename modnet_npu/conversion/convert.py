"""Convert a MODNet ONNX file (any exporter, opset, naming or precision) to PyTorch.

How it works, and why this way: exports of the same network differ in tensor
names, node order, constant storage, BatchNorm folding, Linear form and
precision (the documentation's "The converter"), so nothing here relies on names or order.

1. ``onnx_units``: a table of small handlers keyed by op type turns each
   weight-carrying node (Conv, BatchNormalization, MatMul/Gemm) into a *unit*
   with a structural label (``labels``: kind, channels, kernel, stride, groups)
   and checks parameter-free ones. A BatchNorm that reads a Conv's output
   directly is merged into that Conv's unit, whether the exporter folded it or not.
2. ``onnx_units``: following the graph's edges (the one ``GraphIndex`` of the
   file, ``modnet_npu.graph.index``), each unit gets its *predecessors*: the
   nearest units (or the image input) its data flows from. ``Shape`` cuts the
   flow, so size computations add no false edges.
3. ``trace``: the PyTorch model is traced the same way (on the ``meta``
   device, with a dispatch mode that follows data through every operator).
4. ``matching``: the two unit graphs are matched in execution order: a model
   unit takes the one ONNX unit with its label whose predecessors are the
   images of its own.
5. ``matching``: each pair fills the model's tensors; every target is filled
   exactly once, constants no unit used are reported, and the load is ``strict=True``.

This module puts the steps together (:func:`convert`) and keeps the public
names in one place: ``from modnet_npu.conversion.convert import ...`` reaches
every one of them. State-dict files: ``state_dict``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from modnet_npu.conversion.labels import INPUT, BnLabel, ConversionError, ConvLabel, Label, LinearLabel, describe
from modnet_npu.conversion.matching import fill_state_dict, leftovers, match_units
from modnet_npu.conversion.onnx_units import DATA_INPUTS, HANDLERS, OnnxGraph, OnnxUnit, analyse_onnx, handler
from modnet_npu.conversion.state_dict import CHECKPOINT_SUFFIXES, save_state_dict
from modnet_npu.conversion.trace import ModelUnit, model_units, trace_model_units
from modnet_npu.graph.index import node_name
from modnet_npu.graph.weights import OnnxWeights, read_weights
from modnet_npu.model.modnet import MODNet, MODNetConfig

__all__ = [
    "CHECKPOINT_SUFFIXES", "DATA_INPUTS", "HANDLERS", "INPUT", "BnLabel", "Conversion", "ConversionError",
    "ConversionReport", "ConvLabel", "Label", "LayerMapping", "LinearLabel", "ModelUnit", "OnnxGraph", "OnnxUnit",
    "analyse_onnx", "build_torch_model_from_onnx", "convert", "describe", "fill_state_dict", "handler",
    "match_units", "model_units", "save_state_dict", "trace_model_units",
]


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


@dataclass(frozen=True)
class Conversion:
    """The converted model, its report, and the mapping behind them (for whoever follows the graph further:
    the layer-by-layer comparison reads ``graph``, ``units`` and ``mapping`` instead of matching again)."""

    model: MODNet
    report: ConversionReport
    graph: OnnxGraph  # the ONNX side: its units, the weights and their one GraphIndex (graph.weights.index)
    units: tuple[ModelUnit, ...]  # the model side, in execution order
    mapping: dict[str, OnnxUnit]  # model unit name -> the ONNX unit that filled it


def _layers(units: tuple[ModelUnit, ...], mapping: dict[str, OnnxUnit]) -> tuple[LayerMapping, ...]:
    return tuple(
        LayerMapping(
            mu.name,
            tuple(node_name(n) for n in (mapping[mu.name].node, mapping[mu.name].bn_node) if n is not None),
            tuple(s for src in mapping[mu.name].sources.values() for s in src),
        )
        for mu in units
    )


def convert(source: str | os.PathLike[str] | OnnxWeights, cfg: MODNetConfig = MODNetConfig()) -> Conversion:
    """Build a MODNet (CPU, eval mode) holding the weights of an ONNX file."""
    weights = source if isinstance(source, OnnxWeights) else read_weights(source)
    graph = analyse_onnx(weights)
    units = model_units(cfg)
    mapping = match_units(units, graph)
    model = MODNet(cfg)
    filler = fill_state_dict(model, units, mapping)
    model.load_state_dict(filler.values, strict=True)
    model.eval()
    facts = weights.facts()
    report = ConversionReport(
        source=weights.path,
        opset=facts.opset,
        input_name=graph.input_name,
        output_name=graph.output_name,
        input_shape=facts.inputs[0].shape,
        num_units=len(units),
        num_folded_batchnorms=sum(1 for mu in units if mu.bn and mu.conv and mapping[mu.name].bn_node is None),
        num_source_tensors_used=len(graph.claimed),
        num_parameters=sum(p.numel() for p in model.parameters()),
        layers=_layers(units, mapping),
        synthesized=tuple(filler.synthesized),
        leftovers=tuple(leftovers(graph)),
    )
    return Conversion(model, report, graph, units, mapping)


def build_torch_model_from_onnx(
    path: str | os.PathLike[str], device: str | torch.device | None = None, optimize: bool = True
) -> nn.Module:
    """MODNet with the weights of the ONNX file at ``path``, in eval mode on ``device`` (CPU by default).

    Takes normalised ``[N, 3, H, W]`` float input (H, W multiples of 32) and
    returns ``[N, 1, H, W]`` alpha in [0, 1], whatever size the file was exported at.
    ``optimize=True`` returns the optimized model (``model.optimized``: BatchNorms
    folded, fewer operators, same outputs to 1e-5); ``False`` the faithful
    module-for-module model.
    """
    model: nn.Module = convert(path).model
    if optimize:
        from modnet_npu.model.optimized import optimize as optimized_form

        model = optimized_form(model)
    return model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
