"""The OpenVINO engine: parity with ONNX Runtime at fp32, the precision hint in force, clean refusals."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modnet_npu.graph.contract import NotAMattingModel
from modnet_npu.graph.weights import OnnxReadError
from modnet_npu.runtime import openvino_engine as ove
from modnet_npu.source.synthetic import FLAVOURS

ov = pytest.importorskip("openvino", reason="openvino not installed (pip install -r requirements-bench.txt)")

# Two fp32 implementations summing the same products in another order (blocked,
# vectorised, Winograd or direct) differ by a few ulps per reduction of K terms
# (~sqrt(K) for K up to 9 x 128 here), compounded over MODNet's depth; the
# sigmoid at the end (slope <= 1/4) then maps the logit's error onto [0, 1].
# The bound: at most the 7 lowest of float32's 24 significand bits of a matte
# value near 1 (2**-16 = 128 ulps of 1.0), and 16 ulps on average.
FP32_MAX = 2.0**-16
FP32_MEAN = 2.0**-19


@pytest.fixture(scope="module")
def ort_engines(flavour_files):
    from modnet_npu.runtime.engines import OrtEngine

    return {f: OrtEngine(p, threads=2, validate=False) for f, p in flavour_files.items()}


def _bf16_cpu() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# three flavours stand for the rest in the quick run (dynamic, static batch-1, fp16 weights widened by Cast)
QUICK = ("official", "webnn", "fp16")


@pytest.mark.parametrize("flavour", [f if f in QUICK else pytest.param(f, marks=pytest.mark.slow) for f in FLAVOURS])
def test_fp32_matches_onnxruntime_on_every_flavour(flavour, flavour_files, ort_engines, portrait_input,
                                                   random_input):
    engine = ove.OpenVinoEngine(flavour_files[flavour], threads=2)
    assert engine.precision_in_force == "f32"
    assert engine.fixed_size == ort_engines[flavour].fixed_size
    for x in (portrait_input, random_input):
        ref = ort_engines[flavour].infer(x)
        ours = engine.infer(x)
        assert ours.shape == ref.shape == (1, 256, 256) and ours.dtype == np.float32
        err = np.abs(ours - ref)
        assert err.max() <= FP32_MAX, err.max()
        assert err.mean() <= FP32_MEAN, err.mean()
        assert ref.std() > 0.01  # the matte is not flat: the comparison means something


def test_the_f32_hint_is_read_back_and_matters_on_a_bf16_cpu(webnn_file):
    engine = ove.OpenVinoEngine(webnn_file, threads=2)
    compiled = engine.compiled
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    assert "f32 in force" in engine.description
    if _bf16_cpu():
        # without the hint, OpenVINO would run this fp32 model in bf16 here
        core = ov.Core()
        default = core.compile_model(core.read_model(webnn_file), "CPU")
        assert default.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_reports_what_is_in_force_and_costs_parity(precision, webnn_file, ort_engines,
                                                                  portrait_input):
    engine = ove.OpenVinoEngine(webnn_file, threads=2, precision=precision)
    assert engine.precision_in_force in ("f32", "bf16", "f16")
    assert f"{precision}: {engine.precision_in_force} in force" in engine.description
    err = np.abs(engine.infer(portrait_input) - ort_engines["webnn"].infer(portrait_input))
    if engine.precision_in_force != "f32":
        assert err.max() > FP32_MAX  # half precision is not exact: the cost is visible
    assert err.mean() < 5e-2  # and still a matte of the same portrait


def test_batches_and_fixed_batch_graphs(flavour_files, ort_engines, random_input):
    x = np.concatenate([random_input, -random_input, random_input[:, ::-1].copy()])
    for flavour in ("official", "webnn"):  # dynamic batch; batch fixed at 1 (taken image by image)
        engine = ove.OpenVinoEngine(flavour_files[flavour], threads=2)
        out = engine.infer(x)
        assert out.shape == (3, 256, 256)
        assert np.abs(out - ort_engines[flavour].infer(x)).max() <= FP32_MAX
    assert engine.timed(x[:1]) > 0


def test_refuses_a_broken_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(OnnxReadError) as info:
        ove.OpenVinoEngine(str(bad))
    assert "\n" not in str(info.value)


def test_refuses_a_model_that_is_not_a_matting_model(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    with pytest.raises(NotAMattingModel, match=r"shape \[1, 5\], expected \(N, 3, h, w\)"):
        ove.OpenVinoEngine(str(path))


def test_unknown_precision_and_missing_package(monkeypatch, webnn_file):
    with pytest.raises(ValueError, match="unknown precision"):
        ove.OpenVinoEngine(webnn_file, precision="int8")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ove.OpenVinoUnavailable, match="pip install openvino"):
        ove.OpenVinoEngine(webnn_file)


def test_open_engine_builds_it_on_the_cpu_only(webnn_file):
    from modnet_npu.runtime.engines import BACKEND_CHOICES, open_engine

    assert "openvino" in BACKEND_CHOICES
    from modnet_npu.runtime.options import EngineOptions

    assert open_engine("openvino", webnn_file, EngineOptions(threads=1)).name == "openvino"
    with pytest.raises(ValueError, match="runs on the CPU"):
        open_engine("openvino", webnn_file, EngineOptions(device="cuda"))


def test_the_openvino_path_imports_no_torch(flavour_files):
    path = flavour_files["official"]  # dynamic sizes
    code = ("import sys, numpy as np\n"
            "from modnet_npu.runtime.openvino_engine import OpenVinoEngine\n"
            f"e = OpenVinoEngine({path!r}, threads=1)\n"
            "assert e.infer(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 64, 64)\n"
            "print(sorted(m for m in ('torch', 'modnet_npu.model.modnet') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(ove.__file__).rsplit("/modnet_npu/", 1)[0])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
