from __future__ import annotations

import json

import numpy as np
import pytest

import run_npu_inference as rni
from conftest import PORTRAIT, seed_synthetic_cache

FAST = ["--runs", "3", "--warmup", "1", "--batch-sizes", "1,2"]

REPORT_KEYS = {
    "model": {"source", "path", "sha256", "opset", "num_weight_tensors", "num_parameters", "input_shape"},
    "environment": {"python", "torch", "torch_npu", "cann", "onnxruntime", "device_name", "cpu_model", "os"},
    "input": {"path", "original_size", "model_size"},
    "accuracy": {"mae", "mse", "psnr_db", "max_error", "pct_pixels_err_lt_1pct", "pct_pixels_err_lt_0_5pct",
                 "png", "thresholds", "passed"},
    "memory": {"device_peak_mb", "process_rss_mb"},
}
STATS = {"mean_ms", "median_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "std_ms", "fps", "runs"}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, flavour_files):
    """The main command on an offline machine: it must fall back to a generated model."""
    root = tmp_path_factory.mktemp("main")
    models = root / "models"
    seed_synthetic_cache(models, flavour_files)  # the session's generated file as the cached fallback
    out = root / "output"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = rni.main(["--offline", "--models-dir", str(models), "--output-dir", str(out), *FAST])
    return code, buf.getvalue(), out


def test_offline_main_command_completes_and_says_so(offline_run):
    code, text, out = offline_run
    assert code == 0
    assert text.count("GENERATED MODNet") >= 2  # at the start and at the end
    report = json.loads((out / "evaluation_report.json").read_text())
    for section, keys in REPORT_KEYS.items():
        assert keys <= set(report[section]), (section, keys - set(report[section]))
    assert report["model"]["source"] == "synthetic" and "GENERATED" in report["model"]["warning"]
    assert report["accuracy"]["max_error"] <= 1e-4 and report["accuracy"]["passed"] is True
    perf = report["performance"]
    assert STATS <= set(perf["ort_cpu"]) and STATS <= set(perf["torch_cpu"])
    assert {"speedup_mean", "speedup_median", "throughput"} <= set(perf)
    assert [t["batch_size"] for t in perf["throughput"]] == [1, 2]
    assert {"timestamp", "duration_s", "outputs"} <= set(report)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(report["outputs"])
    assert {"test_input.png", "matte_ort_cpu.png", "matte_cpu.png", "comparison.png", "benchmark.png"} <= set(files)
    assert "| MAE" in text and "median latency" in text


def test_local_dynamic_file_at_another_size(tmp_path, flavour_files, capsys):
    out = tmp_path / "o"
    code = rni.main(["--model", flavour_files["official"], "--size", "320x480", "--output-dir", str(out),
                     "--batch-sizes", "1", "--runs", "2", "--warmup", "0"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "evaluation_report.json").read_text())
    assert report["model"]["source"] == "local" and report["input"]["model_size"] == [320, 480]
    assert report["accuracy"]["max_error"] <= 1e-4


def test_parity_failure_exits_non_zero(tmp_path, webnn_file, capsys):
    code = rni.main(["--model", webnn_file, "--mae-threshold", "0", "--output-dir", str(tmp_path),
                     "--batch-sizes", "1", "--runs", "1", "--warmup", "0"])
    assert code == 3 and "parity FAILED" in capsys.readouterr().err


@pytest.mark.parametrize("args,code,expect", [
    (["--device", "npu"], 1, "torch_npu"),  # a device that is not here: the run fails
    (["--device", "tpu"], 2, "unknown device"),  # not a device at all: a bad option
    (["--image", "/nonexistent.jpg"], 1, "no such file"),
])
def test_clear_one_line_errors(args, code, expect, tmp_path, webnn_file, capsys):
    assert rni.main(["--model", webnn_file, "--output-dir", str(tmp_path / "o"), *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err
    assert not (tmp_path / "o").exists()


def test_cuda_missing_is_a_clear_error(tmp_path, webnn_file, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    assert rni.main(["--model", webnn_file, "--device", "cuda", "--output-dir", str(tmp_path)]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_notebook_example_from_the_seed(webnn_file, seeded_model):
    import torch
    from run_npu_inference import build_torch_model_from_onnx, postprocess, preprocess

    model = build_torch_model_from_onnx(webnn_file)
    model.eval()
    model = model.to(torch.device("cpu"))
    input_data, orig_size = preprocess(str(PORTRAIT))
    assert input_data.shape == (1, 3, 256, 256) and orig_size == (512, 512)
    with torch.no_grad():
        output = model(torch.from_numpy(input_data).to("cpu"))
    matte = postprocess(output.cpu().numpy(), orig_size)
    assert matte.dtype == np.uint8 and matte.shape == (512, 512)
    with torch.no_grad():
        ref = postprocess(seeded_model(torch.from_numpy(input_data)).numpy(), orig_size)
    assert np.abs(matte.astype(int) - ref.astype(int)).max() <= 1


def test_half_precision_run_reports_its_precision(tmp_path, webnn_file):
    out = tmp_path / "bf16"
    code = rni.main(["--model", webnn_file, "--precision", "bf16", "--output-dir", str(out),
                     "--batch-sizes", "1", "--runs", "1", "--warmup", "0"])
    report = json.loads((out / "evaluation_report.json").read_text())
    acc = report["accuracy"]
    assert code == 0 and acc["precision"] == "bf16" and acc["thresholds"]["mae"] == 1e-2
    assert 0 < acc["mae"] <= 1e-2


def test_faithful_form_is_measured_when_asked(tmp_path, webnn_file):
    out = tmp_path / "faithful"
    assert rni.main(["--model", webnn_file, "--model-form", "faithful", "--output-dir", str(out),
                     "--batch-sizes", "1", "--runs", "1", "--warmup", "0"]) == 0
    perf = json.loads((out / "evaluation_report.json").read_text())["performance"]
    assert perf["model_form"] == "faithful"
    # only the measured form is built and counted (the optimized one is not made for a faithful run)
    assert set(perf["operators"]) == {"faithful"} and perf["operators"]["faithful"]["kernels"] > 300


def test_optimized_run_counts_both_forms(offline_run):
    _, _, out = offline_run
    ops = json.loads((out / "evaluation_report.json").read_text())["performance"]["operators"]
    assert ops["optimized"]["kernels"] <= 0.75 * ops["faithful"]["kernels"]
