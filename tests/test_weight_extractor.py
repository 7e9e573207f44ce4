from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from modnet_npu.graph import weights as we
import weight_extractor


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
    assert weight_extractor.main([webnn_file, "--npz", str(out)]) == 0
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
    assert weight_extractor.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err


# ---- external data from untrusted files ------------------------------------


def _tiny_external_model(folder, with_constant: bool = False):
    """y = x + w (+ c): w (and c, a Constant node's tensor) stored in external files beside the model."""
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    nodes = [helper.make_node("Add", ["x", "w"], ["y" if not with_constant else "s"])]
    if with_constant:
        nodes += [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(w * 2, "c")),
                  helper.make_node("Add", ["s", "c"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [x], [y], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    path = folder / "tiny.onnx"
    onnx.save(model, str(path))
    return path, w


def _retarget(path, **entries) -> None:
    """Rewrite the external-data entries of every external tensor (a tampered file)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in we._model_tensors(model):
        for e in tensor.external_data:
            if e.key in entries:
                e.value = str(entries[e.key])
    onnx.save(model, str(path))


def test_valid_external_data_loads(tmp_path):
    path, w = _tiny_external_model(tmp_path / "m", with_constant=True)
    weights = we.read_weights(path)
    np.testing.assert_array_equal(weights.arrays["w"], w)
    np.testing.assert_array_equal(weights.arrays["c"], w * 2)  # a Constant node's external tensor too


@pytest.mark.parametrize("case,problem", [
    ("absolute", "is absolute"),
    ("dotdot", "contains '..'"),
    ("symlink", "outside the model's folder"),
    ("beyond", "holds only"),
    ("too_short", "needs 16384 bytes"),
    ("unknown_key", "unknown external-data key"),
])
def test_tampered_external_data_is_refused_before_reading(tmp_path, case, problem):
    path, _ = _tiny_external_model(tmp_path / "m")
    data = tmp_path / "m" / "w"
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * 16384)  # right size: only the location gives it away
    if case == "absolute":
        _retarget(path, location=data.resolve())
    elif case == "dotdot":
        _retarget(path, location="../secret.bin")
    elif case == "symlink":
        (tmp_path / "m" / "link.bin").symlink_to(outside)
        _retarget(path, location="link.bin")
    elif case == "beyond":
        _retarget(path, offset=8192)
    elif case == "too_short":
        _retarget(path, length=100)
    else:
        model = onnx.load(str(path), load_external_data=False)
        entry = model.graph.initializer[0].external_data.add()
        entry.key, entry.value = "__class__", "x"
        onnx.save(model, str(path))
    with pytest.raises(we.OnnxReadError, match=problem) as info:
        we.load_onnx(path)
    assert not isinstance(info.value, we.MissingExternalDataError)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_symlink_to_a_system_file_is_refused(tmp_path):
    if not os.path.exists("/etc/hostname"):
        pytest.skip("no /etc/hostname here")
    path, _ = _tiny_external_model(tmp_path / "m")
    (tmp_path / "m" / "host").symlink_to("/etc/hostname")
    _retarget(path, location="host")
    with pytest.raises(we.OnnxReadError, match="outside the model's folder"):
        we.load_onnx(path)


def test_missing_external_file_has_its_own_type(tmp_path):
    path, _ = _tiny_external_model(tmp_path / "m")
    (tmp_path / "m" / "w").unlink()
    with pytest.raises(we.MissingExternalDataError, match="external data file missing: w"):
        we.load_onnx(path)


def test_cli_refuses_a_tampered_file_in_one_line(tmp_path, capsys):
    path, _ = _tiny_external_model(tmp_path / "m")
    _retarget(path, location="../../../../etc/passwd")
    assert weight_extractor.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'..'" in err
