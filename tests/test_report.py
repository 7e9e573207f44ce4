from __future__ import annotations

import numpy as np
import pytest

import report


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
