from __future__ import annotations

from collections import Counter

import onnx

import synthetic_model


def _ops(path):
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def test_flavours_are_what_they_claim(flavour_files):
    webnn = onnx.load(flavour_files["webnn"])
    dims = [d.dim_value for d in webnn.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 256, 256] and webnn.graph.input[0].name == "input"
    assert webnn.graph.output[0].name == "output"
    official = onnx.load(flavour_files["official"])
    assert official.opset_import[0].version == 11
    assert [d.dim_param for d in official.graph.input[0].type.tensor_type.shape.dim] == ["batch_size", "", "height", "width"]
    assert onnx.load(flavour_files["opset17"]).opset_import[0].version >= 17
    assert "InstanceNormalization" not in _ops(flavour_files["opset17"])  # mean/var form
    assert _ops(flavour_files["dynamo"])["Gemm"] == 2
    fp16 = onnx.load(flavour_files["fp16"])
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    anon = onnx.load(flavour_files["anonymous"])
    assert not any("branch" in i.name for i in anon.graph.initializer)
    assert _ops(flavour_files["anonymous"])["Gemm"] == 2
    assert _ops(flavour_files["simplified"])["Constant"] == 0
    assert _ops(flavour_files["ort_extended"])["FusedConv"] > 0


def test_batchnorm_statistics_are_not_trivial(seeded_model):
    bn = seeded_model.backbone.model.features[3].conv[1]
    assert bn.running_mean.abs().mean() > 0.1
    assert (bn.running_var - 1).abs().mean() > 0.1


def test_seeded_weights_are_reproducible():
    a, b = synthetic_model.seeded_modnet(3), synthetic_model.seeded_modnet(3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert (va == vb).all(), k
