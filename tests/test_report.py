from __future__ import annotations

import numpy as np
import pytest

from modnet_npu.proof import report


def test_error_metrics_are_right():
    a = np.zeros((10, 10), np.float32)
    b = a.copy()
    b[0, 0] = 0.5
    m = report.error_metrics(a, b)
    assert m.max_error == 0.5 and m.mae == pytest.approx(0.005) and m.mse == pytest.approx(0.0025)
    assert m.psnr_db == pytest.approx(10 * np.log10(1 / 0.0025))
    assert m.pct_pixels_err_lt_1pct == pytest.approx(99.0)
    assert report.error_metrics(a, a).psnr_db == float("inf")


def test_latency_stats():
    s = report.latency_stats([10.0, 20.0, 30.0, 40.0])
    assert s.mean_ms == 25 and s.median_ms == 25 and s.min_ms == 10 and s.max_ms == 40 and s.fps == 40


def test_memory_peak_is_never_below_current():
    m = report.memory(None, 512.4, 512.2)  # ru_maxrss's approximate counter, a little short
    assert m.process_peak_rss_mb == 512.4 and m.process_rss_mb == 512.4
    assert report.memory(10.0, 300.0, 900.0).process_peak_rss_mb == 900.0


@pytest.mark.parametrize("fixed,batch,mode", [
    (None, 1, "batched"), (None, 8, "batched"),
    (1, 1, "sequential"), (1, 8, "sequential"),  # a static batch-1 graph never batches
    (8, 8, "batched"), (8, 2, "sequential"),
])
def test_ort_batch_mode(fixed, batch, mode):
    assert report.ort_batch_mode(fixed, batch) == mode


def _perf(extra: dict) -> report.Performance:
    s = report.latency_stats([10.0, 12.0])
    return report.Performance(ort_cpu=s, torch=s, device_type="cpu", throughput=[], threads=2,
                              model_form="optimized", fast_path="eager", operators={}, extra=extra)


def test_printed_table_marks_a_noisy_run():
    mem = report.memory(None, 100.0, 100.0)
    noisy = report.performance_table(_perf({"noisy": True, "load_average": 1.9, "other_cpu_load": 1.02,
                                            "cpu_time_ratio": 0.9}), mem)
    assert "NOISY: machine busy (other processes used 1.0 CPUs, load 1.9, 2 thread(s))" in noisy
    assert "unreliable" in noisy
    for extra in ({}, {"noisy": False, "load_average": 0.1}):
        assert "NOISY" not in report.performance_table(_perf(extra), mem)


def test_noise_keys_land_in_the_performance_section():
    from modnet_npu.runtime.devices import Environment
    from modnet_npu.proof.timing import Noise

    acc = report.Accuracy(**vars(report.error_metrics(np.zeros(4), np.zeros(4))),
                          png=report.error_metrics(np.zeros(4), np.zeros(4)), thresholds={"mae": 1e-3,
                          "max_error": 5e-2}, passed=True, precision="fp32", device_settings={})
    r = report.Report(
        model=report.ModelInfo("synthetic", "models/x.onnx", "0" * 64, 11, 1, 1, [1, 3, 256, 256], "in", "out",
                               True, 1.0, "generated", "GENERATED", []),
        environment=Environment(*["x"] * 9, 2, "linux"), input=report.InputInfo("p.jpg", [1, 1], [1, 1]),
        conversion=report.ConversionInfo(1, 0, 1, []), accuracy=acc,
        performance=_perf(Noise(1.9, 0.8, 1.0, 2, 2, True).to_dict()), memory=report.memory(None, 2.0, 1.0),
        outputs=[], timestamp="t", duration_s=1.0)
    d = r.to_dict()
    assert d["performance"]["noisy"] is True and d["performance"]["load_average"] == 1.9
    assert d["performance"]["cpu_time_ratio"] == 0.8 and d["performance"]["other_cpu_load"] == 1.0
    assert d["memory"]["process_peak_rss_mb"] >= d["memory"]["process_rss_mb"]
