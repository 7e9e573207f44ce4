from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import onnx
import pytest
from onnx import numpy_helper

from modnet_npu.source import synthetic as synthetic_model
import synthetic_model as synthetic_cli
from conftest import ROOT


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


# the real onnx-community/modnet-webnn file's layout, read from the file itself (docs/REAL_MODEL.md)
REAL_LAYOUT_OPS = {
    "Constant": 241, "Conv": 69, "Clip": 35, "Slice": 32, "Concat": 24, "Relu": 17, "BatchNormalization": 16,
    "InstanceNormalization": 16, "Add": 10, "Resize": 9, "Unsqueeze": 4, "Shape": 3, "Gather": 2, "Reshape": 2,
    "MatMul": 2, "Sigmoid": 2, "GlobalAveragePool": 1, "Expand": 1, "Mul": 1,
}


def _layout(path):
    model = onnx.load(path)
    g = model.graph
    dims = [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    floats = sum(numpy_helper.to_array(i).size for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT)
    floats += sum(numpy_helper.to_array(n.attribute[0].t).size for n in g.node
                  if n.op_type == "Constant" and n.attribute[0].t.data_type == onnx.TensorProto.FLOAT)
    return {"opset": model.opset_import[0].version, "input": (g.input[0].name, dims), "output": g.output[0].name,
            "initializers": len(g.initializer), "ops": dict(Counter(n.op_type for n in g.node)), "floats": floats}


def test_the_fallback_flavour_is_laid_out_like_the_real_file(flavour_files):
    layout = _layout(flavour_files[synthetic_model.FALLBACK_FLAVOUR])
    assert layout == {"opset": 11, "input": ("input", ["batch_size", 3, "height", "width"]), "output": "output",
                      "initializers": 215, "ops": REAL_LAYOUT_OPS, "floats": 6_461_035}


@pytest.mark.slow
def test_the_fallback_flavour_matches_the_real_file_itself(flavour_files, real_model):
    assert _layout(flavour_files[synthetic_model.FALLBACK_FLAVOUR]) == _layout(real_model)


def test_batchnorm_statistics_are_not_trivial(seeded_model):
    bn = seeded_model.backbone.model.features[3].conv[1]
    assert bn.running_mean.abs().mean() > 0.1
    assert (bn.running_var - 1).abs().mean() > 0.1


def test_seeded_weights_are_reproducible():
    a, b = synthetic_model.seeded_modnet(3), synthetic_model.seeded_modnet(3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert (va == vb).all(), k


def test_a_missing_package_is_named_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "onnxscript" else real(name, *a, **k))
    out = tmp_path / "out"
    with pytest.raises(synthetic_model.MissingPackageError, match="dynamo needs onnxscript: pip install onnxscript"):
        synthetic_model.generate(str(out), synthetic_model.FLAVOURS)
    assert not out.exists()  # checked up front: not 3 files of 9, then a traceback
    assert synthetic_cli.main(["--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "onnxscript" in err
    assert not out.exists()


def test_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file.onnx"
    target.write_bytes(b"keep")
    assert synthetic_cli.main(["--out-dir", str(target), "--flavour", "webnn"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {target}: is a file, not a folder\n" and target.read_bytes() == b"keep"


_BLOCK_EXTRAS = '''
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnxscript", "onnxslim"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Block())
'''


def test_the_pipelines_flavour_needs_only_requirements_txt(tmp_path):
    # FALLBACK_FLAVOUR is what resolve.synthetic_fallback generates: it must work where
    # only requirements.txt is installed (no onnxscript, no onnxslim)
    (tmp_path / "sitecustomize.py").write_text(_BLOCK_EXTRAS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    flavour = synthetic_model.FALLBACK_FLAVOUR
    proc = subprocess.run([sys.executable, str(ROOT / "synthetic_model.py"), "--out-dir", str(tmp_path / "out"),
                           "--flavour", flavour], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / f"modnet_{flavour}.onnx").stat().st_size > 20_000_000
    blocked = subprocess.run([sys.executable, str(ROOT / "synthetic_model.py"), "--out-dir", str(tmp_path / "o2"),
                              "--flavour", "simplified"], env=env, capture_output=True, text=True, timeout=120)
    assert blocked.returncode == 1 and "pip install onnxslim" in blocked.stderr  # the blocker does block
