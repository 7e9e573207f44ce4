"""Comparing, layer by layer: :func:`compare_layers` puts the steps together and computes each row.

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

Which ONNX node carries which layer is the conversion's own mapping
(:class:`~modnet_npu.conversion.convert.Conversion`): the file is read, analysed
and matched once, and a conversion already made can be passed in.
"""
from __future__ import annotations

import copy
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from modnet_npu.conversion.convert import Conversion, convert
from modnet_npu.graph.index import GraphIndex
from modnet_npu.graph.weights import OnnxWeights, read_weights
from modnet_npu.model.modnet import MODNet, MODNetConfig, check_input_size
from modnet_npu.model.optimized import OptimizedMODNet
from modnet_npu.model.precision import LAYER_THRESHOLDS
from modnet_npu.proof.layerwise.edges import onnx_tensors
from modnet_npu.proof.layerwise.fp16 import SumRecorder, output_range, peak
from modnet_npu.proof.layerwise.forms import Taps, device_taps, input_dtype, model_device
from modnet_npu.proof.layerwise.plan import Boundary, plan
from modnet_npu.proof.layerwise.report import LayerRow, LayerwiseError, LayerwiseReport, verdicts
from modnet_npu.proof.layerwise.sides import Capture, local_reference, run_onnx, run_torch, with_fast_depthwise


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



@dataclass(frozen=True)
class _Setup:
    weights: OnnxWeights
    reference: MODNet  # faithful, float64, CPU, the file's weights
    local: nn.Module  # the same, depthwise convs swapped for DepthwiseConv64: what local reruns use
    index: GraphIndex  # the file's one graph index, the converter's
    boundaries: list[Boundary]
    tensors: dict[str, tuple[str | None, str]]


def _conversion(path: str | os.PathLike[str], cfg: MODNetConfig, arr: np.ndarray,
                conversion: Conversion | None) -> Conversion:
    """The conversion of ``path``: the one given (checked to be of this file and config), else made here."""
    if conversion is None:
        weights = read_weights(path)
        check_onnx_shape(arr, weights.facts().inputs[0].shape)
        return convert(weights, cfg)
    given = conversion.graph.weights.path
    if os.path.realpath(given) != os.path.realpath(os.fspath(path)):
        raise LayerwiseError(f"the conversion given is of {given}, not of {os.fspath(path)}")
    if conversion.model.cfg != cfg:
        raise LayerwiseError("the conversion given was made for another MODNet configuration than the model's")
    check_onnx_shape(arr, conversion.graph.weights.facts().inputs[0].shape)
    return conversion


def _setup(conversion: Conversion) -> _Setup:
    weights = conversion.graph.weights
    # a copy: the conversion's model may be the very model under test (the pipeline's faithful form)
    reference = copy.deepcopy(conversion.model).double().eval()
    boundaries = plan(reference, [u.name for u in conversion.units])
    tensors = onnx_tensors(weights.index, conversion.graph.input_name, reference, boundaries, conversion.mapping)
    # the local reruns get a copy with fast depthwise convs; the original keeps MODNet's structure for mapping
    local = with_fast_depthwise(copy.deepcopy(reference))
    return _Setup(weights, reference, local, weights.index, boundaries, tensors)


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
    conversion: Conversion | None = None,
) -> LayerwiseReport:
    """Compare ``model`` (``MODNet`` or ``OptimizedMODNet``, any precision) with ONNX Runtime, layer by layer.

    ``x``: normalised float32 input [N, 3, H, W] (H, W multiples of 32; the
    file's fixed sizes if it has any). ``device``: where the model runs (moved
    there, as ``nn.Module.to`` does); None keeps it where it is. ``threshold``
    on the relative error; None takes ``LAYER_THRESHOLDS[precision]``.
    ``conversion``: ``convert(onnx_path)`` if already made, so the file is not
    read, analysed and matched again (it is not changed).
    """
    limit = _threshold(threshold, precision)
    if not isinstance(model, (MODNet, OptimizedMODNet)):
        raise LayerwiseError(f"model must be a MODNet or OptimizedMODNet, got {type(model).__name__}")
    arr = check_input(x, model.cfg.in_channels)
    s = _setup(_conversion(onnx_path, model.cfg, arr, conversion))
    if device is not None:
        model.to(device)
    taps, skipped = _tap_all(model, s)
    ort_out = run_onnx(s.weights.model, (s.tensors[b.layer][0] for b, _ in taps), arr)
    xt = torch.from_numpy(arr).to(model_device(model), input_dtype(model))
    cap = run_torch(model.eval(), xt, {t.out_module for _, t in taps if t.out_module}, {t.in_module for _, t in taps})
    rows = _rows(s, taps, cap, ort_out, skipped)
    first, worst = verdicts(rows, limit)
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
    with SumRecorder(s.local) as sums:
        for (in_module, chain, sigmoid), members in groups.items():
            local = local_reference(s.local, chain, sigmoid, cap.inputs[in_module])
            norm = sums.take()  # the InstanceNorm sums of this rerun, if its chain has an IBNorm
            for b, t in members:
                dev, tensor = cap.outputs[t.out_module or ""], s.tensors[b.layer][0]
                ref = ort_out[tensor]
                if ref.size != dev.numel():
                    skipped.append((b.layer, f"ONNX tensor {tensor!r} is {list(ref.shape)}, "
                                              f"PyTorch's {list(dev.shape)}"))
                    continue
                done[b.layer] = LayerRow(b.layer, s.index.display_name(tensor), tuple(dev.shape),
                                         *compare_tensors(dev, ref, local), output_range(peak(ref), norm))
            del local
    order = sorted(taps, key=lambda bt: cap.order[bt[1].out_module or ""])  # stable: units before branches
    return [done[b.layer] for b, _ in order if b.layer in done]
