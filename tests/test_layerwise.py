"""Layer-by-layer parity (layerwise.py): every flavour, both model forms, injected
faults, half precision, batches, and the report's outputs.

Reports are computed once per module and shared. The static exports take
256x256 only; the fault, half-precision and batch tests use the dynamic
(official) file at 128x128, where the same properties hold at a quarter of the
cost.
"""
from __future__ import annotations

import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from modnet_npu.proof import layerwise
from rounding import graph_rounding_bound
from modnet_npu.source import synthetic as synthetic_model
from modnet_npu.conversion.convert import convert
from modnet_npu.model.optimized import OptimizedMODNet, optimize, with_precision
from modnet_npu.proof.layerwise import LAYER_THRESHOLDS, LayerwiseError, compare_layers, layerwise_figure

HR_LAYER = "hr_branch.conv_hr4x.0.layers.0"  # the first convolution of hr_branch.conv_hr4x
BACKBONE_LAYER = "backbone.model.features.5.conv.3"  # block 5's depthwise conv, inside the enc8x stage
NAMED = set(layerwise.STAGES) | {name for name, _, _ in layerwise.BRANCHES} | {layerwise.MATTE}
SE_UNITS = ("lr_branch.se_block.fc.0", "lr_branch.se_block.fc.2")


def conv_rows(rep: layerwise.LayerwiseReport) -> list[str]:
    return [r.layer for r in rep.rows if r.layer not in NAMED and not r.layer.startswith("lr_branch.se_block")]


@pytest.fixture(scope="module")
def small_input(portrait_input) -> np.ndarray:
    """The portrait at 128x128 (2x2 means): for the dynamic file."""
    return np.ascontiguousarray(portrait_input.reshape(1, 3, 128, 2, 128, 2).mean((3, 5)), dtype=np.float32)


class Reports:
    """Comparisons made on first use and kept for the module."""

    def __init__(self, files: dict[str, str], x: np.ndarray, small: np.ndarray) -> None:
        self.files, self.x, self.small = files, x, small
        self.cache: dict[tuple, layerwise.LayerwiseReport] = {}
        self.seconds: dict[tuple, tuple[float, float]] = {}  # (wall, CPU of all this process's threads)

    def model(self, flavour: str, form: str) -> torch.nn.Module:
        model = convert(self.files[flavour]).model
        return optimize(model) if form == "optimized" else model

    def get(self, flavour: str, form: str = "faithful", batch: int = 1) -> layerwise.LayerwiseReport:
        key = (flavour, form, batch)
        if key not in self.cache:
            x = np.concatenate([self.small, self.small[:, :, :, ::-1]]) if batch == 2 else self.x
            model = self.model(flavour, form)
            wall, cpu = time.perf_counter(), time.process_time()
            self.cache[key] = compare_layers(self.files[flavour], model, np.ascontiguousarray(x), device="cpu")
            self.seconds[key] = (time.perf_counter() - wall, time.process_time() - cpu)
        return self.cache[key]


@pytest.fixture(scope="module")
def reports(flavour_files, portrait_input, small_input) -> Reports:
    return Reports(flavour_files, portrait_input, small_input)


# --------------------------------------------------------------------------
# the unmodified model agrees everywhere
# --------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", synthetic_model.FLAVOURS)
def test_faithful_form_has_no_divergence_on_every_flavour(reports, flavour):
    rep = reports.get(flavour)
    assert rep.first_divergence is None
    assert rep.threshold == LAYER_THRESHOLDS["fp32"]
    assert all(r.rel <= rep.threshold and r.cosine > 0.99999 for r in rep.rows)
    assert all(r.local_rel < 1e-5 for r in rep.rows)  # float32 against a float64 rerun
    names = [r.layer for r in rep.rows]
    assert rep.layers_compared == len(rep.rows) == len(set(names))
    assert [n for n in names if n in NAMED][-1] == "matte" and names[-1] == "matte"
    assert {"enc2x", "enc4x", "enc8x", "enc16x", "enc32x", "lr_branch", "hr_branch", "matte"} <= set(names)
    assert set(SE_UNITS) <= set(names)
    if flavour == "ort_extended":
        # ONNX Runtime fused the last conv with the model's final sigmoid: no equal tensor exists
        assert [layer for layer, _ in rep.skipped] == ["f_branch.conv_f.1.layers.0", "f_branch.conv_f"]
        assert all("Sigmoid" in reason for _, reason in rep.skipped)
        assert len(conv_rows(rep)) == 68
    else:
        assert rep.skipped == ()
        assert len(conv_rows(rep)) == 69 and "f_branch.conv_f" in names


@pytest.mark.parametrize("flavour", ["webnn", "official"])
def test_optimized_form_has_no_divergence(reports, flavour):
    rep = reports.get(flavour, "optimized")
    assert rep.first_divergence is None
    assert all(r.rel <= rep.threshold for r in rep.rows)
    assert len(conv_rows(rep)) == 69
    # the SE block's activations run inside OptimizedMODNet.forward: no module boundary equals them
    assert [layer for layer, _ in rep.skipped] == list(SE_UNITS)
    assert all("activation" in reason for _, reason in rep.skipped)
    # same layers, same execution order as the faithful form, less the skipped ones
    faithful = [r.layer for r in reports.get(flavour).rows if r.layer not in SE_UNITS]
    assert [r.layer for r in rep.rows] == faithful


def test_rows_follow_execution_order(reports):
    names = [r.layer for r in reports.get("webnn").rows]
    assert names[0] == "backbone.model.features.0.0"
    assert names.index("backbone.model.features.1.conv.3") + 1 == names.index("enc2x")
    assert names.index("enc32x") < names.index(SE_UNITS[0]) < names.index("lr_branch.conv_lr16x.layers.0")
    assert names.index("lr_branch.conv_lr8x.layers.0") + 1 == names.index("lr_branch")
    assert names.index("hr_branch") < names.index("f_branch.conv_lr4x.layers.0")
    row = {r.layer: r for r in reports.get("webnn").rows}
    assert row["enc8x"].shape == (1, 32, 32, 32) and row["matte"].shape == (1, 1, 256, 256)
    assert row["enc32x"].onnx_node == row["backbone.model.features.18.0"].onnx_node


def test_the_layerwise_session_still_computes_the_model(flavour_files, portrait_input):
    # graph optimisation is off so every intermediate tensor exists; the output must not move
    path = flavour_files["official"]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: portrait_input})[0]
    model = onnx.load(path)
    got = layerwise.run_onnx(model, ["output"], portrait_input)
    # ORT's fused kernels sum in another order: rounding alone parts them (measured 6.6e-6 on an AMD
    # EPYC, 1.44e-5 on an Intel AVX-512/AMX CPU; the bound for this file is 8.7e-5, tests/rounding.py)
    assert np.abs(got["output"] - expected).max() <= graph_rounding_bound(model, expected)


def test_the_layerwise_session_comes_from_the_one_session_factory(flavour_files, portrait_input, monkeypatch):
    from modnet_npu.proof.layerwise import sides

    calls = []
    real = sides.ort_session
    monkeypatch.setattr(sides, "ort_session", lambda model, *a, **kw: calls.append(kw) or real(model, *a, **kw))
    layerwise.run_onnx(onnx.load(flavour_files["official"]), ["output"], portrait_input)
    assert calls == [{"optimization": "none"}]


def test_a_conversion_passed_in_is_reused_not_redone(flavour_files, small_input, monkeypatch):
    from modnet_npu.proof.layerwise import compare as compare_module

    path = flavour_files["official"]
    conversion = convert(path)
    model = optimize(convert(path).model)
    expected = compare_layers(path, model, small_input).to_dict()
    monkeypatch.setattr(compare_module, "convert", lambda *a, **kw: pytest.fail("converted the file again"))
    got = compare_layers(path, model, small_input, conversion=conversion).to_dict()
    assert got == expected
    # the conversion's model is copied for the float64 reference, not cast in place
    assert next(conversion.model.parameters()).dtype == torch.float32
    with pytest.raises(LayerwiseError, match="the conversion given is of .*modnet_official.onnx, not of"):
        compare_layers(flavour_files["webnn"], model, small_input, conversion=conversion)


def test_time_at_256_is_small_enough_to_leave_on(reports):
    # measured on two idle cores: 1.3-1.5 s wall. When other jobs share the cores the wall
    # time says more about them, so the CPU time this process used (all threads) counts too.
    reports.get("webnn")
    wall, cpu = reports.seconds[("webnn", "faithful", 1)]
    assert min(wall, cpu) < 20, f"compare_layers took {wall:.1f} s ({cpu:.1f} s CPU) at 256x256"


# --------------------------------------------------------------------------
# an injected fault is found, and blamed on the right layer
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults(flavour_files, small_input) -> dict[tuple[str, str], layerwise.LayerwiseReport]:
    path, out = flavour_files["official"], {}
    for form in ("faithful", "optimized"):
        for layer in (HR_LAYER, BACKBONE_LAYER):
            faithful = convert(path).model
            model = optimize(faithful) if form == "optimized" else faithful
            name = layerwise.optimized_module_name(faithful, layer) + ".conv" if form == "optimized" else layer
            with torch.no_grad():
                model.get_submodule(name).weight.mul_(1.01)
            out[form, layer] = compare_layers(path, model, small_input)
    return out


@pytest.mark.parametrize("form", ["faithful", "optimized"])
@pytest.mark.parametrize("layer", [HR_LAYER, BACKBONE_LAYER])
def test_a_scaled_weight_is_the_first_divergence_and_the_worst_local(faults, form, layer):
    rep = faults[form, layer]
    names = [r.layer for r in rep.rows]
    at = names.index(layer)
    assert rep.first_divergence == layer
    assert all(r.rel <= rep.threshold for r in rep.rows[:at])
    assert rep.worst_local == layer
    bad = rep.rows[at]
    assert bad.rel > 5e-3 and bad.local_rel > 5e-3  # measured ~1e-2: a 1% weight error
    # every other layer only inherits the error: its own rerun agrees with it
    assert max(r.local_rel for r in rep.rows if r.layer != layer) < 1e-5
    assert rep.rows[-1].rel > rep.threshold  # and the matte shows it


# --------------------------------------------------------------------------
# half precision: the decoder loses accuracy, the float32 backbone does not
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half(flavour_files, small_input) -> dict[str, layerwise.LayerwiseReport]:
    path, out = flavour_files["official"], {}
    for precision in ("fp16", "bf16"):
        model, in_dtype = with_precision(optimize(convert(path).model), precision)
        assert in_dtype == torch.float32 and isinstance(model, OptimizedMODNet)
        out[precision] = compare_layers(path, model, small_input, precision=precision)
    return out


@pytest.mark.parametrize("precision, decoder_min, decoder_max", [("fp16", 1e-4, 1e-2), ("bf16", 1e-3, 5e-2)])
def test_half_precision_rows(half, precision, decoder_min, decoder_max):
    rep = half[precision]
    assert rep.threshold == LAYER_THRESHOLDS[precision]
    assert len(conv_rows(rep)) == 69
    names = [r.layer for r in rep.rows]
    split = names.index("enc32x") + 1
    backbone, decoder = rep.rows[:split], rep.rows[split:]
    # the backbone runs in float32: its rows are as close as the float32 model's
    assert all(r.rel < LAYER_THRESHOLDS["fp32"] and r.local_rel < 1e-5 for r in backbone)
    # every decoder layer rounds (measured local_rel: fp16 3.6e-4..9.6e-4, bf16 3.3e-3..6.9e-3) ...
    assert all(decoder_min < r.local_rel < decoder_max for r in decoder)
    # ... so at the float32 threshold the first half-precision layer is where it diverges,
    assert next(r.layer for r in rep.rows if r.rel > LAYER_THRESHOLDS["fp32"]) == "lr_branch.conv_lr16x.layers.0"
    # but within the precision's own bound it does not (worst rel: fp16 2.6e-3, bf16 2.4e-2)
    assert rep.first_divergence is None
    assert rep.worst_local in names[split:]


# --------------------------------------------------------------------------
# batches, static and dynamic files, input errors
# --------------------------------------------------------------------------


def test_dynamic_file_takes_batch_2(reports):
    # the optimized form: its in-place ops and batch-wide tensors are where a batch could go wrong
    rep = reports.get("official", "optimized", batch=2)
    assert rep.first_divergence is None
    assert all(r.shape[0] == 2 for r in rep.rows)
    assert {r.layer: r for r in rep.rows}["matte"].shape == (2, 1, 128, 128)


def test_static_file_refuses_another_batch(flavour_files, portrait_input):
    model = convert(flavour_files["webnn"]).model
    x2 = np.concatenate([portrait_input] * 2)
    with pytest.raises(LayerwiseError, match=r"takes input \[1, 3, 256, 256\]; x has shape \[2, 3, 256, 256\]"):
        compare_layers(flavour_files["webnn"], model, x2)


@pytest.mark.parametrize("x, match", [
    (np.zeros((3, 256, 256), np.float32), "must be 4-D"),
    (np.zeros((1, 4, 256, 256), np.float32), "must have 3 channels"),
    (np.zeros((1, 3, 250, 256), np.float32), "multiples of 32"),
])
def test_bad_input_is_one_line_error(flavour_files, x, match):
    model = convert(flavour_files["official"]).model
    with pytest.raises(LayerwiseError, match=match) as info:
        compare_layers(flavour_files["official"], model, x)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_bad_options_are_errors(flavour_files, portrait_input):
    model = convert(flavour_files["official"]).model
    with pytest.raises(LayerwiseError, match="unknown precision 'fp8'"):
        compare_layers(flavour_files["official"], model, portrait_input, precision="fp8")
    with pytest.raises(LayerwiseError, match="MODNet or OptimizedMODNet"):
        compare_layers(flavour_files["official"], torch.nn.Identity(), portrait_input)


# --------------------------------------------------------------------------
# what the report gives back
# --------------------------------------------------------------------------


def test_to_dict_is_json(faults):
    rep = faults["faithful", HR_LAYER]
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["first_divergence"] == d["worst_local"] == HR_LAYER
    assert len(d["rows"]) == rep.layers_compared and d["threshold"] == rep.threshold
    assert set(d["rows"][0]) >= {"layer", "onnx_node", "shape", "max_abs", "mean_abs", "rel", "cosine",
                                 "local_max_abs"}


def test_worst_table_lists_at_most_n_worst(faults):
    rep = faults["faithful", BACKBONE_LAYER]
    for n in (0, 3, 10, 1000):
        lines = rep.worst_table(n).splitlines()
        assert len(lines) - 2 == min(n, len(rep.rows))
    lines = rep.worst_table(3).splitlines()
    worst = max(rep.rows, key=lambda r: r.rel)
    assert lines[0].startswith("| layer |") and lines[2].startswith(f"| {worst.layer} **!** |")


def test_figure_is_a_png_written_atomically(faults, tmp_path):
    pytest.importorskip("matplotlib")
    dest = tmp_path / "layerwise.png"
    layerwise_figure(faults["optimized", HR_LAYER], dest)
    assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["layerwise.png"]  # no temporary file left


# --------------------------------------------------------------------------
# fp16 range: what float16 would make of each layer
# --------------------------------------------------------------------------


def test_fp16_spacing_is_numpys_for_float16():
    from modnet_npu.proof.layerwise.fp16 import fp16_spacing

    values = np.array([2.0 ** -20, 2.0 ** -14, 0.7, 1.0, 1000.0, 1024.0, 4097.0, 40000.0])
    assert np.array_equal(fp16_spacing(values), np.spacing(values.astype(np.float16)).astype(np.float64))
    assert fp16_spacing(np.array([65504.0]))[0] == 32.0  # where numpy's spacing overflows to inf


@pytest.mark.parametrize("side, value, overflow, absorbed", [
    (32, 1.0, False, False),  # Σx² = 1024, spacing 1: each term 1 still counts
    (64, 1.0, False, True),  # Σx² = 4096, spacing 4: a term of 1 rounds away
    (128, 2.0, True, True),  # Σx² = 65536 > 65504; terms of 4 stop counting at 32768 (spacing 32)
    (256, 100.0, True, False),  # terms of 10000 are not absorbed, the sum overflows
])
def test_instance_norm_sums_on_known_planes(side, value, overflow, absorbed):
    from modnet_npu.proof.layerwise.fp16 import instance_norm_sums

    x = torch.full((1, 2, side, side), value, dtype=torch.float64)
    x[0, 1] = -value / 2  # a second channel with smaller, negative values: the maxima come from the first
    sums = instance_norm_sums("m", x)
    assert sums.count == side * side
    assert sums.max_abs_sum == side * side * value and sums.max_sum_squares == side * side * value * value
    assert (sums.overflow, sums.absorbed) == (overflow, absorbed)


def test_output_range_flags():
    from modnet_npu.proof.layerwise.fp16 import output_range

    assert output_range(65504.0).flagged is False and output_range(65505.0).overflow
    assert output_range(2.0 ** -15).underflow and not output_range(2.0 ** -14).underflow
    assert not output_range(0.0).flagged  # an all-zero tensor is exact in fp16


def test_rows_carry_fp16_range_and_instance_norm_sums(reports, flavour_files, portrait_input):
    rep = reports.get("webnn")
    rows = {r.layer: r for r in rep.rows}
    assert all(r.fp16.max_magnitude > 0 for r in rep.rows)
    # the converted model's own output, measured here: the row's peak is ONNX Runtime's tensor's
    assert rows["matte"].fp16.max_magnitude <= 1.0
    # backbone layers have no InstanceNorm; every Conv2dIBNormRelu with an IBNorm does
    assert rows["backbone.model.features.0.0"].fp16.instance_norm is None
    layer, norm_module = "lr_branch.conv_lr16x.layers.0", "lr_branch.conv_lr16x.layers.1"
    sums = rows[layer].fp16.instance_norm
    assert sums is not None and sums.module == norm_module and sums.count == 16 * 16  # 256 / 16
    # the same sums, measured independently: the float32 model's IBNorm input, summed in float64
    model = convert(flavour_files["webnn"]).model
    seen = {}

    def record(module, inputs) -> None:  # returning None: a pre-hook's return value would replace the input
        seen["x"] = inputs[0][:, module.bnorm_channels:].double()

    handle = model.get_submodule(norm_module).register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.from_numpy(portrait_input))
    handle.remove()
    expected = float(seen["x"].square().sum((2, 3)).max())
    conv = model.get_submodule(layer)
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    # float32's conv differs from the float64 rerun by at most fan_in roundings per value; squared, twice that
    assert abs(sums.max_sum_squares - expected) <= 2 * fan_in * 2.0 ** -24 * expected
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["fp16"]["max"] == 65504.0 and d["fp16"]["flagged"] == list(rep.fp16_flagged)
    row = next(r for r in d["rows"] if r["layer"] == layer)
    assert row["fp16"]["instance_norm"]["count"] == 256 and isinstance(row["fp16"]["flagged"], bool)
    assert set(rep.fp16_flagged) == {r.layer for r in rep.rows if r.fp16.flagged}
