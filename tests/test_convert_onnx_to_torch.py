from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from modnet_npu.conversion import convert as c2t
from modnet_npu.graph.index import node_name
import convert_onnx_to_torch
from modnet_npu.source.synthetic import FLAVOURS
from modnet_npu.model.modnet import load_checkpoint

FP32_MAX = 1e-4
FP16_MAX, FP16_MEAN = 1e-2, 1e-3


def _ort(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def converted(flavour_files):
    return {f: c2t.convert(p) for f, p in flavour_files.items()}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("which", ["portrait", "random"])
def test_matches_onnxruntime_on_every_flavour(flavour, which, flavour_files, converted, request):
    x = request.getfixturevalue(f"{which}_input")
    with torch.no_grad():
        ours = converted[flavour].model(torch.from_numpy(x)).numpy()
    ref = _ort(flavour_files[flavour], x)
    err = np.abs(ours - ref)
    # fp16 weights are widened by Cast, so the file computes in float32 too
    assert err.max() <= (FP16_MAX if flavour == "fp16" else FP32_MAX), err.max()
    assert err.mean() <= FP16_MEAN
    assert ref.std() > 0.01  # the matte is not flat: the comparison means something


def test_fp16_file_carries_its_rounded_weights(converted, portrait_input):
    # the converted fp16 file is the fp16-rounded network, not the fp32 one
    x = torch.from_numpy(portrait_input)
    with torch.no_grad():
        d = (converted["fp16"].model(x) - converted["webnn"].model(x)).abs()
    assert 0 < float(d.max()) <= FP16_MAX
    w16 = converted["fp16"].model.state_dict()["lr_branch.conv_lr16x.layers.0.weight"]
    assert torch.equal(w16, w16.half().float())


@pytest.mark.parametrize("shape", [(1, 3, 512, 512), (1, 3, 320, 480), (4, 3, 256, 256)])
def test_static_file_runs_at_other_sizes(shape, converted, seeded_model):
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32))
    with torch.no_grad():
        ours = converted["webnn"].model(x)
        ref = seeded_model(x)
    assert ours.shape == (shape[0], 1, *shape[2:])
    assert float((ours - ref).abs().max()) <= FP32_MAX


def test_dynamic_file_matches_onnxruntime_at_320x480(flavour_files, converted):
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 320, 480)).astype(np.float32)
    with torch.no_grad():
        ours = converted["official"].model(torch.from_numpy(x)).numpy()
    assert np.abs(ours - _ort(flavour_files["official"], x)).max() <= FP32_MAX


@pytest.mark.parametrize("hw", [(64, 64), (128, 96)])
def test_converted_model_runs_on_meta(hw, converted):
    meta = copy.deepcopy(converted["anonymous"].model).to("meta")
    out = meta(torch.empty(2, 3, *hw, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 1, *hw)


def test_report_accounts_for_everything(converted):
    r = converted["webnn"].report
    assert r.num_units == 69 + 16 + 2
    assert r.num_folded_batchnorms == 52
    assert r.leftovers == ()
    assert r.num_parameters == 6_476_609
    # only folded BatchNorm identities and training counters are synthesised
    assert all("folded" in s or "counter" in s for s in r.synthesized)
    modules = [layer.module for layer in r.layers]
    assert len(modules) == len(set(modules))
    nodes = [n for layer in r.layers for n in layer.onnx_nodes]
    assert len(nodes) == len(set(nodes))


def test_conversion_carries_the_mapping_behind_its_report(converted):
    c = converted["anonymous"]  # unnamed nodes: the report names them by the index's display names
    assert [u.name for u in c.units] == [layer.module for layer in c.report.layers]
    for layer in c.report.layers:
        unit = c.mapping[layer.module]
        assert layer.onnx_nodes[0] == unit.name == node_name(unit.node)
        assert c.graph.weights.index.producer(unit.node.output[0]) is unit.node
    # one index per file: the conversion's graph walks the weights' own
    assert c.graph.weights.index is c.graph.weights.index and len(c.graph.units) == c.report.num_units


def test_unnamed_nodes_are_reported_by_op_and_output(tmp_path, webnn_file, converted):
    m = onnx.load(webnn_file)
    for node in m.graph.node:
        node.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(m, str(path))
    c = c2t.convert(str(path))
    first = c.report.layers[0]
    unit = c.mapping[first.module]
    assert first.onnx_nodes[0] == f"<Conv -> {unit.node.output[0]}>"
    named = converted["webnn"].model.state_dict()
    assert all(torch.equal(v, named[k]) for k, v in c.model.state_dict().items())


def test_dynamo_export_keeps_batchnorm_unfolded_or_folded_alike(converted):
    r = converted["dynamo"].report
    assert r.num_units == 87 and r.leftovers == ()


def test_build_returns_eval_model_on_device(webnn_file):
    model = c2t.build_torch_model_from_onnx(webnn_file)
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"


def test_unused_weight_is_reported(tmp_path, webnn_file):
    m = onnx.load(webnn_file)
    m.graph.initializer.append(numpy_helper.from_array(np.ones((4, 4), np.float32), "stray_weight"))
    path = tmp_path / "extra.onnx"
    onnx.save(m, str(path))
    assert ("stray_weight", (4, 4)) in c2t.convert(str(path)).report.leftovers


def _tiny_conv_graph(path):
    w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 32, 32])], [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _wrong_shape(path, webnn_file):
    m = onnx.load(webnn_file)
    for i, init in enumerate(m.graph.initializer):
        if init.name == "lr_branch.conv_lr16x.layers.0.weight":
            m.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(np.zeros((96, 1280, 3, 3), np.float32), init.name))
    onnx.save(m, str(path))


@pytest.mark.parametrize("case,expect", [
    ("missing", "no such file"),
    ("truncated", "truncated"),
    ("not-modnet", "not a MODNet graph"),
    ("wrong-shape", "lr_branch.conv_lr16x.layers.0"),
])
def test_bad_inputs_give_one_line_errors(case, expect, tmp_path, webnn_file, capsys):
    path = tmp_path / "bad.onnx"
    if case == "truncated":
        path.write_bytes(open(webnn_file, "rb").read()[:5_000_000])
    elif case == "not-modnet":
        _tiny_conv_graph(path)
    elif case == "wrong-shape":
        _wrong_shape(path, webnn_file)
    assert convert_onnx_to_torch.main([str(path), "-o", str(tmp_path / "out.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "out.pt").exists()


def test_wrong_shape_error_names_the_tensor(tmp_path, webnn_file):
    path = tmp_path / "bad.onnx"
    _wrong_shape(path, webnn_file)
    with pytest.raises(c2t.ConversionError, match=r"wrong weight shape.*lr_branch.conv_lr16x.layers.0.weight.*\(96, 1280, 3, 3\)"):
        c2t.convert(str(path))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_writes_a_strict_loadable_state_dict(suffix, tmp_path, webnn_file, seeded_model, capsys):
    out = tmp_path / f"modnet{suffix}"
    assert convert_onnx_to_torch.main([webnn_file, "-o", str(out)]) == 0
    assert "87 layers placed" in capsys.readouterr().out
    model = load_checkpoint(str(out))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert float((model(x) - seeded_model(x)).abs().max()) <= FP32_MAX


def test_cli_loads_official_checkpoint(tmp_path, seeded_model):
    state = {"module." + k: v for k, v in seeded_model.state_dict().items()}
    state |= {"module.lr_branch." + k: v for k, v in seeded_model.state_dict().items() if k.startswith("backbone.")}
    state["module.hr_branch.conv_hr.1.layers.0.weight"] = torch.zeros(1, 32, 1, 1)
    ckpt = tmp_path / "modnet_webcam_portrait_matting.ckpt"
    torch.save(state, ckpt)
    out = tmp_path / "out.safetensors"
    assert convert_onnx_to_torch.main([str(ckpt), "-o", str(out)]) == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(str(out))(x), seeded_model(x))


def test_hardware_specific_ort_layouts_are_refused_clearly(tmp_path, flavour_files):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "all.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(flavour_files["official"], so, providers=["CPUExecutionProvider"])
    if not any(n.domain == "com.microsoft.nchwc" for n in onnx.load(str(tmp_path / "all.onnx")).graph.node):
        pytest.skip("this ONNX Runtime build applied no NCHWc layout")
    with pytest.raises(c2t.ConversionError, match="layout optimisations"):
        c2t.convert(str(tmp_path / "all.onnx"))
