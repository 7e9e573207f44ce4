from __future__ import annotations

import numpy as np
import onnx
import pytest

import weight_extractor as we


def test_reads_initializers_and_constant_nodes(flavour_files):
    plain = we.read_weights(flavour_files["webnn"])
    anon = we.read_weights(flavour_files["anonymous"])
    assert {i.source for i in anon.infos.values()} == {"initializer", "constant"}
    # the same float values, however they are stored
    total = lambda w: sum(v.size for v in w.float_tensors().values())  # noqa: E731
    assert total(anon) == pytest.approx(total(plain), rel=0.01)
    assert all(v.dtype == np.float32 for v in anon.float_tensors().values())


def test_float16_weights_widen_through_cast(flavour_files):
    w16 = we.read_weights(flavour_files["fp16"])
    w32 = we.read_weights(flavour_files["webnn"])
    assert any(i.dtype == "float16" for i in w16.infos.values())
    conv = next(n for n in w16.model.graph.node if n.op_type == "Conv")
    name = conv.input[1]  # a Cast output, not stored
    assert name not in w16.arrays
    value = w16.resolve(name)
    assert value is not None and value.dtype == np.float32
    np.testing.assert_array_equal(value, w32.arrays[name].astype(np.float16).astype(np.float32))
    assert w16.sources(name) == (name + "_fp16",)


def test_external_data(tmp_path, webnn_file):
    model = onnx.load(webnn_file)
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.data", size_threshold=1024)
    assert (tmp_path / "ext.data").stat().st_size > 20_000_000
    ext = we.read_weights(path)
    ref = we.read_weights(webnn_file)
    for k, v in ref.arrays.items():
        np.testing.assert_array_equal(ext.arrays[k], v)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(we.OnnxReadError, match="external data"):
        we.read_weights(path)


def test_facts_and_summary(webnn_file):
    s = we.summarize(we.read_weights(webnn_file))
    assert s.opset == 13 and s.inputs[0].name == "input" and s.inputs[0].shape == (1, 3, 256, 256)
    assert s.outputs[0].shape == (1, 1, 256, 256)
    assert s.num_float_values > 6_400_000


def test_cli_summary_and_npz(tmp_path, webnn_file, capsys):
    out = tmp_path / "w.npz"
    assert we.main([webnn_file, "--npz", str(out)]) == 0
    text = capsys.readouterr().out
    assert "opset:           13" in text and "input: float32 [1, 3, 256, 256] (static)" in text
    with np.load(out) as data:
        assert len(data.files) == len(we.read_weights(webnn_file).arrays)


@pytest.mark.parametrize("case", ["missing", "truncated", "empty", "folder"])
def test_bad_files_one_line_error(tmp_path, webnn_file, capsys, case):
    path = tmp_path / "m.onnx"
    if case == "truncated":
        path.write_bytes(open(webnn_file, "rb").read()[:100_000])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    assert we.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err
