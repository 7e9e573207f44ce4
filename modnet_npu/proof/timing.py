"""Interleaved timing: the one loop every comparison of speed in the project uses.

Contenders run round by round, in an order that rotates each round, so the
drift of a noisy machine (another process, thermal throttling) hits all of them
alike; a device is synchronised around each timed call so that what is measured
is the computation, not its launch.

:class:`NoiseProbe` says afterwards whether the machine was busy meanwhile
(load average, this process's CPU time over wall time, other processes' CPU
use), so a report can mark timings taken on a shared machine.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

Call = Callable[[], object]
T = TypeVar("T")


def rotated(names: Sequence[T], r: int) -> list[T]:
    """Round ``r``'s order: ``names`` started at the ``r``-th (modulo their number), so each takes every place
    in turn and none always runs right after the same other one. The one rotation of every interleaved
    comparison here (timings, whole processes, servers under load)."""
    k = r % len(names)
    return list(names[k:]) + list(names[:k])


def timed_ms(fn: Call, sync: Callable[[], None] = lambda: None) -> float:
    """Milliseconds of one synchronised call of ``fn``."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000.0


def interleaved(contenders: Mapping[str, Call], *, runs: int, warmup: int = 0,
                sync: Callable[[], None] = lambda: None, rotate: bool = True,
                after_warmup: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Times in ms per contender, ``runs`` each, after ``warmup`` untimed calls each.

    ``rotate``: start each round with the next contender, so none always runs
    right after the same other one (cache and frequency effects); off, the order
    is fixed (A B A B ...). ``after_warmup`` runs once between warm-up and timing
    (e.g. resetting a peak-memory counter).
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    after_warmup()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in rotated(names, r if rotate else 0):
            times[name].append(timed_ms(contenders[name], sync))
    return times


# --------------------------------------------------------------------------
# how busy the machine was
# --------------------------------------------------------------------------


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuTimes:
    """Busy and total CPU seconds of the CPUs this process may run on, since boot."""

    busy_s: float
    total_s: float


def cpu_times(stat_path: str = "/proc/stat") -> CpuTimes | None:
    """Summed over this process's CPUs, from ``/proc/stat``; None where there is none.

    Idle means idle or waiting for I/O; time stolen by the hypervisor counts as
    busy (another machine had the core). Guest time is already inside user time.
    """
    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (AttributeError, OSError):
        mine = None
    try:
        with open(stat_path) as fh:
            lines = [ln.split() for ln in fh if ln.startswith("cpu") and not ln.startswith("cpu ")]
    except OSError:
        return None
    busy = total = 0
    for f in lines:
        if mine is not None and f[0] not in mine:
            continue
        ticks = [int(v) for v in f[1:9]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    if total == 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return CpuTimes(busy / hz, total / hz)


@dataclass(frozen=True)
class CpuSample:
    """A moment's CPU counters: this process's CPUs (``cpu_times``) and this process's own CPU seconds."""

    at: float  # time.monotonic()
    times: CpuTimes | None
    own_s: float


def cpu_sample() -> CpuSample:
    own = os.times()
    return CpuSample(time.monotonic(), cpu_times(), own.user + own.system)


def idle_cpus_since(start: CpuSample, *, at_least_s: float) -> float | None:
    """How many of this process's CPUs other processes left idle since ``start``, waiting until at least
    ``at_least_s`` has passed. This process's own CPU time counts as free (it is the time it may use), so
    the interval may be one in which it was working: loading its libraries, say."""
    wait = start.at + at_least_s - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    end = cpu_sample()
    if start.times is None or end.times is None or end.times.total_s <= start.times.total_s:
        return None
    others = max(0.0, (end.times.busy_s - start.times.busy_s) - (end.own_s - start.own_s))
    return usable_cpus() * (1.0 - min(1.0, others / (end.times.total_s - start.times.total_s)))


def idle_cpus(interval_s: float = 0.3) -> float | None:
    """How many of this process's CPUs other processes left idle over the next ``interval_s``."""
    return idle_cpus_since(cpu_sample(), at_least_s=interval_s)


@dataclass(frozen=True)
class Noise:
    """How much else the machine did while we timed (see :class:`NoiseProbe`)."""

    load_average: float  # 1-minute load average at the end (this process's own threads included)
    cpu_time_ratio: float  # this process's CPU seconds / wall seconds over the timed runs
    other_cpu_load: float | None  # CPUs' worth used by other processes meanwhile (None: not measurable here)
    cpus: int  # CPUs this process may run on
    threads: int  # the threads the timed code used
    noisy: bool

    def to_dict(self) -> dict:
        """The report's keys (``performance.load_average`` ...)."""
        return {"load_average": round(self.load_average, 2), "cpu_time_ratio": round(self.cpu_time_ratio, 2),
                "other_cpu_load": None if self.other_cpu_load is None else round(self.other_cpu_load, 2),
                "noisy": self.noisy}

    def describe(self) -> str:
        """One line for a printed table."""
        others = "" if self.other_cpu_load is None else f"other processes used {self.other_cpu_load:.1f} CPUs, "
        state = "NOISY: machine busy" if self.noisy else "machine quiet"
        return (f"{state} ({others}load {self.load_average:.1f} on {self.cpus} CPUs, "
                f"CPU time / wall time {self.cpu_time_ratio:.2f})"
                + (" - timings unreliable" if self.noisy else ""))


def is_noisy(other_cpu_load: float, cpus: int, threads: int) -> bool:
    """The rule: other processes took CPU time the timed code needed, or a good part of the machine.

    Noisy when the CPUs others left free fall short of the timed code's threads
    by more than half a CPU (its threads queued behind them: OpenMP's barriers
    then wait on a descheduled thread, ×6 measured), or when others used more
    than max(0.5, a quarter of the CPUs) even if our threads had their cores
    (shared caches and memory bandwidth, SMT siblings).
    """
    short = threads - (cpus - other_cpu_load) > 0.5
    return short or other_cpu_load > max(0.5, 0.25 * cpus)


class NoiseProbe:
    """Context manager around timed runs: ``with NoiseProbe(threads=2) as probe: ...``, then ``probe.result``.

    Measures the 1-minute load average at the end, this process's CPU time over
    wall time, and (from ``/proc/stat``, on the process's own CPUs) the CPU
    time other processes used meanwhile: busy CPU time of the machine less this
    process's. Without ``/proc/stat`` (macOS), the others' load is estimated as
    the load average less this process's own CPU use. See :func:`is_noisy`.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.cpus = usable_cpus()
        self.threads = threads or self.cpus
        self._result: Noise | None = None

    def __enter__(self) -> "NoiseProbe":
        self._start = (time.perf_counter(), time.process_time(), cpu_times())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, cpu0, machine0 = self._start
        wall = max(time.perf_counter() - wall0, 1e-9)
        ratio = (time.process_time() - cpu0) / wall
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        machine1 = cpu_times()
        if machine0 is not None and machine1 is not None and machine1.total_s > machine0.total_s:
            busy = (machine1.busy_s - machine0.busy_s) / (machine1.total_s - machine0.total_s) * self.cpus
            other = max(0.0, busy - ratio)
        else:
            other = max(0.0, load - ratio) if hasattr(os, "getloadavg") else None
        noisy = other is not None and is_noisy(other, self.cpus, self.threads)
        self._result = Noise(load, ratio, other, self.cpus, self.threads, noisy)

    @property
    def result(self) -> Noise:
        if self._result is None:
            raise RuntimeError("NoiseProbe.result is read after the with-block")
        return self._result
