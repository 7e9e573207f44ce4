"""The figures say what they must: verdict, thresholds, precision, a generated model, a busy machine;
the error map has one fixed colour scale with its bar."""
from __future__ import annotations

import io
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from modnet_npu.proof import figures
from modnet_npu.proof import report


def _accuracy(ort: np.ndarray, dev: np.ndarray, passed: bool, precision: str = "fp32") -> report.Accuracy:
    m = report.error_metrics(ort, dev)
    return report.Accuracy(**asdict(m), png=m, thresholds={"mae": 1e-3, "max_error": 5e-2}, passed=passed,
                           precision=precision, device_settings={})


@pytest.fixture(scope="module")
def mattes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    ort = np.tile(np.linspace(0, 1, 96, dtype=np.float32), (64, 1))
    good = ort + rng.normal(0, 1e-5, ort.shape).astype(np.float32)
    bad = np.clip(ort + rng.normal(0, 0.1, ort.shape).astype(np.float32), 0, 1)
    return image, ort, good, bad


def _heat_image(fig):
    found = [im for ax in fig.axes for im in ax.get_images() if im.get_gid() == "error-map"]
    assert len(found) == 1
    return found[0]


def test_comparison_says_verdict_thresholds_precision_and_generated(mattes):
    image, ort, good, _ = mattes
    fig = figures.comparison_chart(image, ort, good, device="cpu", accuracy=_accuracy(ort, good, True),
                                   synthetic=True)
    text = figures.figure_text(fig)
    for words in ("PASS", "MAE", "max error", "< 0.001", "< 0.05", "precision fp32", "GENERATED MODEL",
                  "ONNX Runtime CPU", "PyTorch"):
        assert words in text, words
    real = figures.figure_text(figures.comparison_chart(image, ort, good, device="npu:0",
                                                        accuracy=_accuracy(ort, good, False, "fp16")))
    assert "GENERATED" not in real and "FAIL" in real and "fp16" in real and "npu:0" in real


def test_heat_map_scale_is_fixed_with_a_colour_bar(mattes):
    image, ort, good, bad = mattes
    calm = figures.comparison_chart(image, ort, good, device="cpu")
    loud = figures.comparison_chart(image, ort, bad, device="cpu")
    probe = np.array([[1e-3]])
    for fig in (calm, loud):
        heat = _heat_image(fig)
        assert (heat.norm.vmin, heat.norm.vmax) == figures.ERROR_RANGE
        assert len(fig.axes) == 5  # four panels and the colour bar
    # the same error has the same colour whatever else the run's errors are
    assert np.array_equal(_heat_image(calm).to_rgba(probe), _heat_image(loud).to_rgba(probe))
    assert np.array_equal(_heat_image(calm).to_rgba(probe), figures.error_colours(probe))
    # and a failing run does not look as calm as a passing one: 0.1 is far brighter than 1e-5
    lum = lambda rgba: float(np.dot(rgba[..., :3].reshape(-1, 3).mean(0), [0.3, 0.59, 0.11]))  # noqa: E731
    assert lum(figures.error_colours(np.abs(bad - ort))) > lum(figures.error_colours(np.abs(good - ort))) + 0.3


def _performance(noisy: bool) -> report.Performance:
    ort_t, torch_t = [90.0, 95.0, 100.0, 88.0], [130.0, 120.0, 150.0, 125.0]
    return report.Performance(
        ort_cpu=report.latency_stats(ort_t), torch=report.latency_stats(torch_t), device_type="cpu",
        throughput=[report.Throughput(1, 7.5, 10.5, "sequential"), report.Throughput(8, 9.0, 10.0, "sequential")],
        threads=2, model_form="optimized", fast_path="batch-parallel x2", operators={},
        extra={"noisy": noisy, "load_average": 1.9, "other_cpu_load": 1.0, "cpu_time_ratio": 1.1})


def test_benchmark_names_engines_shows_spread_throughput_and_noise():
    times = {"ort": [90.0, 95.0, 100.0, 88.0], "torch": [130.0, 120.0, 150.0, 125.0]}
    fig = figures.benchmark_chart(_performance(noisy=True), times, "MODNet 256x256")
    text = figures.figure_text(fig)
    assert "ONNX Runtime CPU" in text and "PyTorch CPU" in text and "ORTCPU" not in text
    assert "median 92.5 ms" in text and "median 127.5 ms" in text
    assert "machine busy" in text and "throughput" in text and "batch 8" in text
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert [t.get_text() for t in legends[0].get_texts()] == ["ONNX Runtime CPU", "PyTorch CPU"]
    notes = [t for t in fig.texts if "machine busy" in t.get_text()]
    assert notes and notes[0].get_color() == figures.WARN_COLOUR
    quiet = figures.figure_text(figures.benchmark_chart(_performance(noisy=False), times, "MODNet 256x256"))
    assert "machine busy" not in quiet


def test_pngs_have_sensible_sizes_and_are_written_atomically(tmp_path, mattes):
    image, ort, good, _ = mattes
    times = {"ort": [90.0, 95.0], "torch": [130.0, 120.0]}
    for fig, name in ((figures.comparison_chart(image, ort, good, device="cpu"), "comparison.png"),
                      (figures.benchmark_chart(_performance(False), times, "t"), "benchmark.png")):
        data = figures.png_bytes(fig)
        w, h = Image.open(io.BytesIO(data)).size
        assert 1000 <= w <= 2000 and 400 <= h <= 800, (name, w, h)
        figures.save_png(fig, str(tmp_path / name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmark.png", "comparison.png"]
    assert Image.open(tmp_path / "comparison.png").format == "PNG"
