"""The ONNX graph index (modnet_npu/graph/index.py): producers, consumers, data inputs,
attributes and display names, on small hand-built graphs whose answers are known."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modnet_npu.graph.index import DATA_INPUTS, GraphIndex, attr, data_inputs, is_data_input, node_name
from modnet_npu.graph.weights import OnnxWeights


def _graph() -> onnx.GraphProto:
    """x -> Relu "relu" -> y; Add(y, y) unnamed -> z; Shape(y) -> s; Reshape(z, s) -> out; Clip(out, lo, hi)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="relu"),
        helper.make_node("Add", ["y", "y"], ["z"]),
        helper.make_node("Shape", ["y"], ["s"], name="shape"),
        helper.make_node("Reshape", ["z", "s"], ["r"], name="reshape"),
        helper.make_node("Clip", ["r", "lo", ""], ["out"], name="clip"),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2]),
    ]
    inits = [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")]
    return helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
        inits,
    )


@pytest.fixture()
def index() -> GraphIndex:
    return GraphIndex(_graph())


def test_producers(index):
    assert index.producer("y").name == "relu"
    assert index.producer("z").op_type == "Add"
    assert index.producer("x") is None and index.producer("w") is None  # graph input, initializer
    assert index.producer("nothing") is None
    assert index.produced("out") and not index.produced("lo")


def test_consumers_one_entry_per_reading_input(index):
    assert [n.op_type for n in index.consumers("y")] == ["Add", "Add", "Shape"]  # Add reads y twice
    assert [(n.op_type, i) for n, i in index.uses("y")] == [("Add", 0), ("Add", 1), ("Shape", 0)]
    assert [(n.name, i) for n, i in index.uses("s")] == [("reshape", 1)]
    assert index.consumers("out") == ()  # a graph output nothing reads
    assert index.uses("") == ()  # an omitted optional input is nobody's tensor
    assert index.outputs == ("out", "c")


def test_data_inputs_leave_out_sizes_bounds_and_omitted_inputs(index):
    reshape, clip, shape, add = index.producer("r"), index.producer("out"), index.producer("s"), index.producer("z")
    assert data_inputs(reshape) == ["z"] and not is_data_input(reshape, 1)
    assert data_inputs(clip) == ["r"]  # lo is a bound, "" is omitted
    assert data_inputs(shape) == [] and DATA_INPUTS["Shape"] == ()
    assert data_inputs(add) == ["y", "y"] and is_data_input(add, 1)  # an op not in the table: every input


def test_flow_from_the_image_is_cut_by_shape(index):
    flow = index.flows_from("x")
    assert {"x", "y", "z", "r", "out", "c"} <= flow
    assert "s" not in flow and "lo" not in flow and "w" not in flow
    assert index.flows_from("x") is flow  # computed once
    assert index.flows_from("s") == {"s"}  # s feeds Reshape's shape input only: no data flows on


def test_attributes_decode_bytes_to_str():
    conv = _graph().node[5]
    assert attr(conv, "auto_pad") == "SAME_UPPER"  # stored as bytes in the proto
    assert attr(conv, "strides") == [2, 2]
    assert attr(conv, "dilations", [1, 1]) == [1, 1] and attr(conv, "group") is None
    node = helper.make_node("FusedConv", ["x", "w"], ["y"], activation="Relu", activation_params=[1.5],
                            names=["a", "b"])
    assert attr(node, "activation") == "Relu" and isinstance(attr(node, "activation"), str)
    assert attr(node, "names") == ["a", "b"]  # a list of strings too
    assert attr(node, "activation_params") == [1.5]


def test_display_names(index):
    assert node_name(index.producer("y")) == "relu"
    assert node_name(index.producer("z")) == "<Add -> z>"  # unnamed: op and first output
    assert node_name(helper.make_node("Split", ["x"], ["", "b"])) == "<Split -> b>"
    assert node_name(helper.make_node("Foo", ["x"], [])) == "<Foo>"
    assert index.display_name("z") == "<Add -> z>" and index.display_name("r") == "reshape"
    assert index.display_name("x") == "x"  # no node produces a graph input


def test_weights_build_the_index_once_and_resolve_through_it():
    graph = _graph()
    graph.node.append(helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0, 3, 2]))
    weights = OnnxWeights(helper.make_model(graph))
    assert weights.index is weights.index
    assert weights.index.producer("wt").op_type == "Transpose"
    assert weights.resolve("wt").shape == (1, 1, 3, 3) and weights.sources("wt") == ("w",)
    assert weights.resolve("y") is None  # data, not a constant
