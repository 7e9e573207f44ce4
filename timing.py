"""Interleaved timing: the one loop every comparison of speed in the project uses.

Contenders run round by round, in an order that rotates each round, so the
drift of a noisy machine (another process, thermal throttling) hits all of them
alike; a device is synchronised around each timed call so that what is measured
is the computation, not its launch.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

Call = Callable[[], object]


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
        k = r % len(names) if rotate else 0
        for name in names[k:] + names[:k]:
            times[name].append(timed_ms(contenders[name], sync))
    return times
