"""Layer-by-layer parity: PyTorch MODNet (either form, any device, any precision)
against ONNX Runtime on the CPU, at every boundary where both hold the same tensor.

A matte-level error says *that* the port is wrong, not *where*. This package
compares, in execution order,

* every converted unit's output (a Conv or Linear with its norm and activation),
* the backbone stages enc2x, enc4x, enc8x, enc16x, enc32x (the official backbone's split),
* the branch outputs lr8x (``lr_branch``), hr2x (``hr_branch``), the fusion
  logits (``f_branch.conv_f``) and the matte,

and gives each row a *local* error besides the inherited one, so a layer that
introduces error is told apart from one that only passes it on.

Its modules, in the order a comparison uses them:

* ``plan``: which boundaries exist, in the faithful model's module names;
* ``forms``: where to hook the device model (faithful ``MODNet`` or ``OptimizedMODNet``);
* ``edges``: the ONNX tensor equal to each boundary, found by following the
  graph's edges from the node the converter mapped the layer to;
* ``sides``: running ONNX Runtime (every compared tensor kept), PyTorch (hooks)
  and the float64 local reruns;
* ``compare``: :func:`compare_layers`, the numbers of each row, the verdicts;
* ``fp16``: what float16 would make of each row: its output's largest
  magnitude and its InstanceNorm's sums, flagged where fp16 would overflow or
  lose them (``LayerwiseReport.fp16_flagged``, ``layerwise.json``);
* ``report``: the rows and verdicts as a report, JSON and a markdown table;
* ``figure``: the error per layer as a PNG.

Everything a caller needs is importable from here.
"""
from modnet_npu.model.precision import LAYER_THRESHOLDS  # re-exported: notebooks import it from here
from modnet_npu.proof.layerwise.compare import check_input, check_onnx_shape, compare_layers, compare_tensors
from modnet_npu.proof.layerwise.edges import onnx_tensors, residual_tensor, tail, tail_ops, unit_tensor
from modnet_npu.proof.layerwise.figure import layerwise_figure
from modnet_npu.proof.layerwise.fp16 import FP16_MAX, Fp16Range, InstanceNormSums
from modnet_npu.proof.layerwise.forms import Taps, device_taps, optimized_module_name
from modnet_npu.proof.layerwise.plan import BRANCHES, MATTE, STAGES, Boundary, plan, unit_chain
from modnet_npu.proof.layerwise.report import LayerRow, LayerwiseError, LayerwiseReport
from modnet_npu.proof.layerwise.sides import (Capture, DepthwiseConv64, local_reference, run_onnx, run_torch,
                                              with_fast_depthwise)

__all__ = [
    "BRANCHES", "FP16_MAX", "Fp16Range", "InstanceNormSums", "LAYER_THRESHOLDS", "MATTE", "STAGES", "Boundary", "Capture", "DepthwiseConv64", "LayerRow",
    "LayerwiseError", "LayerwiseReport", "Taps", "check_input", "check_onnx_shape", "compare_layers",
    "compare_tensors", "device_taps", "optimized_module_name", "layerwise_figure", "local_reference", "onnx_tensors",
    "plan", "residual_tensor", "run_onnx", "run_torch", "tail", "tail_ops", "unit_chain", "unit_tensor",
    "with_fast_depthwise",
]
