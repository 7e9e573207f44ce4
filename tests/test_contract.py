"""The torch-free check that a file is a matting model the runtime engines can run (graph/contract.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from modnet_npu.graph.contract import NotAMattingModel, check_matting_file
from modnet_npu.graph.weights import OnnxReadError
from modnet_npu.source.synthetic import FLAVOURS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_flavour_passes_with_its_declared_size(flavour, flavour_files):
    c = check_matting_file(flavour_files[flavour])
    assert c.input_shape[1] == 3 and c.output_shape[1] == 1
    static = flavour in ("webnn", "opset17", "dynamo", "fp16")
    assert c.fixed_size == ((256, 256) if static else None)


def _graph(path: Path, outputs: int = 1, in_shape=(1, 3, 8, 8), out_shape=(1, 1, 8, 8), op: str = "Conv") -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, in_shape[1], 1, 1], [0.1] * in_shape[1])
    nodes = [helper.make_node(op, ["x", "w"] if op == "Conv" else ["x"], ["y0"])]
    outs = [helper.make_tensor_value_info("y0", TensorProto.FLOAT, list(out_shape))]
    for i in range(1, outputs):
        nodes.append(helper.make_node("Identity", ["y0"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, list(out_shape)))
    g = helper.make_graph(nodes, "g", [x], outs, initializer=[w] if op == "Conv" else [])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def test_what_is_not_modnets_contract_is_named(tmp_path):
    assert check_matting_file(_graph(tmp_path / "ok.onnx")).fixed_size == (8, 8)
    with pytest.raises(NotAMattingModel, match="expected one output, found 7"):  # u2net's side outputs
        check_matting_file(_graph(tmp_path / "u2.onnx", outputs=7))
    with pytest.raises(NotAMattingModel, match=r"input 'x' has shape \[1, 4, 8, 8\]"):
        check_matting_file(_graph(tmp_path / "rgba.onnx", in_shape=(1, 4, 8, 8)))
    with pytest.raises(NotAMattingModel, match="no convolutions"):
        check_matting_file(_graph(tmp_path / "relu.onnx", op="Relu"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(OnnxReadError):
        check_matting_file(bad)


def test_the_check_imports_no_torch(flavour_files):
    code = (f"from modnet_npu.graph.contract import check_matting_file; check_matting_file({flavour_files['official']!r})\n"
            "import sys; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
