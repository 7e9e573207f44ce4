"""The interleaved loop and the noise probe (real measurements, no timing assertions on speed)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from modnet_npu.proof import timing


def test_interleaved_rotates_and_counts():
    calls: list[str] = []
    contenders = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = timing.interleaved(contenders, runs=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    calls.clear()
    timing.interleaved(contenders, runs=2, rotate=False)
    assert calls == list("abcabc")


def test_rotated_gives_each_contender_every_place_in_turn():
    names = ("a", "b", "c")
    orders = [timing.rotated(names, r) for r in range(4)]
    assert orders == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert all(sorted(o) == list(names) for o in orders)
    # two contenders: rotation is alternation (the serve suite's batching on/off, round by round)
    assert [timing.rotated(("on", "off"), r) for r in range(3)] == [["on", "off"], ["off", "on"], ["on", "off"]]


@pytest.mark.parametrize("other,cpus,threads,noisy", [
    (0.0, 2, 2, False), (0.3, 2, 2, False), (1.0, 2, 2, True),  # the case: one busy process, 2 cores
    (0.6, 2, 1, True),   # our thread had a core, but the machine was busy
    (1.0, 64, 4, False), (20.0, 64, 4, True), (0.8, 64, 64, True),
])
def test_noise_rule(other, cpus, threads, noisy):
    assert timing.is_noisy(other, cpus, threads) is noisy


def test_cpu_times_reads_only_this_process_cpus(tmp_path):
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    other = max(mine) + 1
    lines = ["cpu  1000 0 0 1000 0 0 0 0 0 0"]
    lines += [f"cpu{i} 100 0 50 800 50 0 0 0 0 0" for i in mine]  # 150 busy of 1000 each
    lines += [f"cpu{other} 900 0 0 100 0 0 0 0 0 0", "intr 1 2 3"]
    stat = tmp_path / "stat"
    stat.write_text("\n".join(lines) + "\n")
    t = timing.cpu_times(str(stat))
    hz = os.sysconf("SC_CLK_TCK")
    assert t.busy_s == pytest.approx(150 * len(mine) / hz) and t.total_s == pytest.approx(1000 * len(mine) / hz)
    assert timing.cpu_times(str(tmp_path / "missing")) is None


def test_probe_measures_this_process_cpu_time():
    # Load-independent: the block burns a fixed 0.3 s of CPU time (not of wall time, which a busy
    # machine stretches), so the probe's CPU time (ratio x its wall time, at most the block's) is
    # at least 0.3 s however long the block had to wait for a core.
    with timing.NoiseProbe(threads=1) as idle:
        time.sleep(0.3)
    start = time.perf_counter()
    with timing.NoiseProbe(threads=1) as spin:
        cpu0 = time.process_time()
        while time.process_time() - cpu0 < 0.3:
            pass
    wall = time.perf_counter() - start
    assert idle.result.cpu_time_ratio < 0.2  # asleep: the process used (almost) no CPU, busy machine or not
    assert spin.result.cpu_time_ratio * wall >= 0.3
    d = spin.result.to_dict()
    assert set(d) == {"load_average", "cpu_time_ratio", "other_cpu_load", "noisy"} and d["load_average"] >= 0


@pytest.mark.skipif(timing.cpu_times() is None, reason="no /proc/stat here")
def test_probe_flags_a_busy_process_beside_it():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with timing.NoiseProbe(threads=timing.usable_cpus()) as probe:
            time.sleep(1.0)
    finally:
        busy.kill()
        busy.wait()
    r = probe.result
    assert r.other_cpu_load is not None and r.other_cpu_load > 0.6  # at least most of one CPU, others included
    assert r.noisy and "NOISY" in r.describe() and "unreliable" in r.describe()


def test_result_before_the_block_ends_is_an_error():
    probe = timing.NoiseProbe()
    with pytest.raises(RuntimeError):
        _ = probe.result
