"""Process set-up: threads as effective counts, OpenMP's spin bound set before torch loads."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modnet_npu.runtime import process_setup
from modnet_npu.proof import timing

ROOT = Path(__file__).resolve().parents[1]
IMPORT = "from modnet_npu.runtime import process_setup"  # in a child: its own interpreter, torch not loaded yet


def test_threads_are_clamped_to_the_cpus_this_process_may_use():
    n = timing.usable_cpus()
    assert process_setup.effective_threads(999) == n
    assert process_setup.effective_threads(1) == 1
    assert 1 <= process_setup.effective_threads(0, interval_s=0.05) <= n
    with pytest.raises(ValueError):
        process_setup.effective_threads(-1)


@pytest.mark.parametrize("idle,expect", [(1.97, 2), (0.96, 1), (1.4, 1), (1.6, 2), (0.05, 1), (7.0, 2)])
def test_free_cpus_counts_the_idle_ones(monkeypatch, idle, expect):
    monkeypatch.setattr(process_setup, "usable_cpus", lambda: 2)
    monkeypatch.setattr(process_setup, "idle_cpus", lambda interval_s: idle)
    monkeypatch.setattr(process_setup, "_START_SAMPLE", None)
    assert process_setup.free_cpus() == expect


def _counters(at: float, busy: float, total: float, own: float) -> timing.CpuSample:
    return timing.CpuSample(at, timing.CpuTimes(busy, total), own)


def test_the_first_free_cpus_measures_from_the_start_without_sleeping(monkeypatch):
    """The entry point's start-up is the sample: 2 s of 2 CPUs, 1.1 CPU-seconds busy of which 0.8 were this
    process's own: others used 0.3 of 4, so 2 * (1 - 0.075) = 1.85 CPUs were free: 2 threads, no sleep."""
    now = [100.0]
    monkeypatch.setattr(timing.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(timing.time, "sleep", lambda s: pytest.fail(f"slept {s} s"))
    monkeypatch.setattr(timing, "usable_cpus", lambda: 2)
    monkeypatch.setattr(process_setup, "usable_cpus", lambda: 2)
    monkeypatch.setattr(process_setup, "_START_SAMPLE", _counters(98.0, 10.0, 20.0, 0.0))
    monkeypatch.setattr(timing, "cpu_sample", lambda: _counters(now[0], 11.1, 24.0, 0.8))
    monkeypatch.setattr(process_setup, "idle_cpus", lambda interval_s: pytest.fail("sampled afresh"))
    assert timing.idle_cpus_since(process_setup._START_SAMPLE, at_least_s=0.3) == pytest.approx(1.85)
    assert process_setup.free_cpus() == 2
    assert process_setup._START_SAMPLE is None  # used once: a later call measures "now", not the start


def test_a_start_sample_counts_others_work_and_waits_out_a_short_start(monkeypatch):
    now, slept = [100.0], []
    monkeypatch.setattr(timing.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(timing.time, "sleep", lambda s: slept.append(s) or now.__setitem__(0, now[0] + s))
    monkeypatch.setattr(timing, "usable_cpus", lambda: 2)
    # 0.1 s after the start; others kept one CPU busy (0.3 of 0.6 CPU-seconds), this process none
    monkeypatch.setattr(timing, "cpu_sample", lambda: _counters(now[0], 10.3, 20.6, 0.0))
    idle = timing.idle_cpus_since(_counters(99.9, 10.0, 20.0, 0.0), at_least_s=0.3)
    assert slept == [pytest.approx(0.2)] and idle == pytest.approx(1.0)


def test_a_stale_start_sample_is_not_used(monkeypatch):
    monkeypatch.setattr(process_setup, "_START_SAMPLE", _counters(time.monotonic() - 60, 0.0, 1.0, 0.0))
    monkeypatch.setattr(process_setup, "idle_cpus", lambda interval_s: 1.0)
    monkeypatch.setattr(process_setup, "usable_cpus", lambda: 2)
    assert process_setup.free_cpus() == 1 and process_setup._START_SAMPLE is None


def test_setup_process_records_the_effective_thread_count():
    import torch

    before = torch.get_num_threads()
    try:
        s = process_setup.setup_process(threads=999)
        assert s.threads == timing.usable_cpus() == torch.get_num_threads() and s.requested_threads == 999
        assert s.openmp.get("late") == "yes"  # torch was loaded before: nothing changed, and it says so
    finally:
        torch.set_num_threads(before)


def _child(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean | env, capture_output=True,
                          text=True, timeout=120, check=True)


def test_spin_bound_reaches_libgomp_when_set_before_torch():
    code = (f"import sys; {IMPORT}; assert 'torch' not in sys.modules; "
            "print(process_setup.configure_openmp()); import torch; torch.ones(4).sum()")
    out = _child(code, OMP_DISPLAY_ENV="VERBOSE")  # libgomp prints the settings it read, when loaded
    assert f"'GOMP_SPINCOUNT': '{process_setup.GOMP_SPINCOUNT}'" in out.stdout
    if "GOMP_SPINCOUNT" in out.stderr:  # libgomp (the OpenMP of Linux builds of torch)
        assert f"GOMP_SPINCOUNT = '{process_setup.GOMP_SPINCOUNT}'" in out.stderr


def test_a_wait_policy_the_user_set_wins():
    out = _child(f"{IMPORT}; print(process_setup.configure_openmp())", OMP_WAIT_POLICY="ACTIVE")
    assert "GOMP_SPINCOUNT" not in out.stdout and "'OMP_WAIT_POLICY': 'ACTIVE'" in out.stdout
