"""Process-wide settings, applied once by each entry point through :func:`setup_process`.

Library modules never change threads, the allocator, environment variables or
PIL's globals on their own: a notebook that imports them keeps its settings.
The command-line tools, the service and the benchmarks call this first, and
call :func:`configure_openmp` before anything imports torch.

This module imports torch only inside functions, so an entry point can import
it (and set OpenMP's environment) before torch is loaded.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

from modnet_npu.proof.timing import CpuSample, cpu_sample, idle_cpus, idle_cpus_since, usable_cpus

# Big photos are fine (a 100 MP panorama); decompression bombs are not. PIL's own
# default (89 MP, error at twice that) refuses large but real camera files.
MAX_IMAGE_PIXELS = 200_000_000

# How long an idle OpenMP thread spins at a barrier before it sleeps, in libgomp's
# spin-loop turns: about 25 ns each here, so its default of 300000 is ~7 ms, a whole
# scheduler time slice. PyTorch's CPU forward of MODNet passes ~250 barriers; when
# another process holds a core, the spinning thread keeps its core while its partner
# waits for a turn on the other, at every barrier (issue #13: 113 -> 691 ms). 1000 is
# what libgomp itself uses when it knows its threads outnumber the CPUs. Measured with
# `benchmark.py busy` (benchmarks/busy_machine_2core.json: 2 cores, 256x256, 2 threads,
# medians of 8 fresh processes): PyTorch 75 ms quiet and 249 ms (169-286) beside one
# busy process with libgomp's default; 74 and 149 ms with 1000; 71 and 187 ms with 3000;
# 88 and 131 ms with OMP_WAIT_POLICY=PASSIVE (ONNX Runtime 50 ms quiet, ~80-95 busy).
GOMP_SPINCOUNT = 1000

_ALLOCATOR_TUNED = False
_DEFERRED_TORCH_THREADS: int | None = None  # setup_process(defer_torch=True) before torch was loaded
# The CPU counters when the entry point started (configure_openmp, its first call): the first
# free_cpus() measures from there, over the seconds the process spent loading its libraries, instead
# of sleeping 0.3 s for a sample of its own (a fifth of a one-photo run on ONNX Runtime).
_START_SAMPLE: CpuSample | None = None
START_SAMPLE_MAX_AGE_S = 10.0  # older says little about "now": sample afresh


def _openmp_loaded() -> bool:
    """Whether an OpenMP runtime is already in this process (it reads its environment once, when loaded)."""
    if "torch" in sys.modules:
        return True
    try:
        with open("/proc/self/maps") as fh:
            return any("libgomp" in line or "libiomp" in line or "libomp" in line for line in fh)
    except OSError:
        return False


def configure_openmp(spincount: int = GOMP_SPINCOUNT) -> dict[str, str]:
    """Bound OpenMP's spin-waiting, before torch (and its libgomp) is loaded; returns the settings in force.

    A ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` the user set wins. Once an OpenMP
    runtime is loaded it is too late, and nothing is changed (the returned dict
    says ``"late": "yes"``).
    """
    global _START_SAMPLE
    if _START_SAMPLE is None:
        _START_SAMPLE = cpu_sample()
    keys = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
    if _openmp_loaded():
        return {k: os.environ[k] for k in keys if k in os.environ} | {"late": "yes"}
    if not any(k in os.environ for k in keys):
        os.environ["GOMP_SPINCOUNT"] = str(spincount)
    return {k: os.environ[k] for k in keys if k in os.environ}


def free_cpus(interval_s: float = 0.3) -> int:
    """The CPUs of this process that other processes leave free, sampled over ``interval_s`` (at least 1).

    The first call after :func:`configure_openmp` measures from that moment (at least ``interval_s``
    before now, this process's own work not counted against it), without sleeping when the entry
    point's start-up took that long.

    From ``/proc/stat`` on the process's own CPUs (idle CPU time summed over them,
    rounded: 1.5 idle CPUs count as 2); elsewhere the 1-minute load average. With
    one busy process on two cores this gives 1 thread: PyTorch 124 ms against 263 ms
    with two (benchmark.py busy); on a quiet machine, every CPU.
    """
    global _START_SAMPLE
    n, start, _START_SAMPLE = usable_cpus(), _START_SAMPLE, None
    if start is not None and time.monotonic() - start.at <= START_SAMPLE_MAX_AGE_S:
        idle = idle_cpus_since(start, at_least_s=interval_s)  # the entry point's start-up, used once
    else:
        idle = idle_cpus(interval_s)
    if idle is None:
        idle = n - os.getloadavg()[0] if hasattr(os, "getloadavg") else float(n)
    return max(1, min(n, math.floor(idle + 0.5)))


def effective_threads(requested: int = 0, *, interval_s: float = 0.3) -> int:
    """The CPU thread count a run uses: ``requested`` clamped to the CPUs this process may use;
    0 means automatic: the CPUs actually free (:func:`free_cpus`)."""
    if requested < 0:
        raise ValueError(f"threads must be 0 (automatic) or more, got {requested}")
    if requested == 0:
        return free_cpus(interval_s)
    return min(requested, usable_cpus())


def tune_cpu_allocator() -> bool:
    """Keep large freed blocks in the heap (glibc only); returns whether it applied.

    MODNet's activations are tens to hundreds of MB; glibc serves blocks above
    its mmap threshold (at most 32 MB) with mmap and returns them on free, so
    every forward pays page faults to zero fresh pages again. Measured on the
    2-core development machine, five alternating pairs of processes (faithful
    model, 256x256, batch 1, median of 7 forwards each): 148 ms with glibc's
    defaults, 131 ms tuned (faster in 4 pairs of 5).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


@dataclass(frozen=True)
class ProcessSettings:
    threads: int  # the effective CPU thread count: record this one, and give it to both engines
    requested_threads: int  # what was asked for (0 = automatic)
    allocator_tuned: bool
    compile_cache_dir: str | None
    max_image_pixels: int
    openmp: dict[str, str]  # GOMP_SPINCOUNT / OMP_WAIT_POLICY in force ("late": set after OpenMP loaded)


def setup_process(*, threads: int = 0, compile_cache_dir: str | None = None,
                  max_image_pixels: int = MAX_IMAGE_PIXELS, defer_torch: bool = False) -> ProcessSettings:
    """Apply the process-wide settings of a run; returns what is in force.

    ``threads``: CPU threads (0 = the CPUs actually free now, see :func:`free_cpus`;
    more than the CPUs this process may use is clamped). The effective count is
    ``.threads``. ``compile_cache_dir``: inductor's scratch files go there (a
    TORCHINDUCTOR_CACHE_DIR the user set wins). ``defer_torch``: where torch is
    not loaded yet, do not load it for its thread count (seconds): the count is
    kept for :func:`apply_torch_threads`, which ``engines.open_engine`` calls when
    it opens a PyTorch engine, so a run on ONNX Runtime or OpenVINO never loads torch.
    """
    global _DEFERRED_TORCH_THREADS
    openmp = configure_openmp()  # a no-op when the entry point already did it, before torch
    from PIL import Image

    effective = effective_threads(threads)
    if defer_torch and "torch" not in sys.modules:
        _DEFERRED_TORCH_THREADS = effective
    else:
        import torch

        torch.set_num_threads(effective)
        _DEFERRED_TORCH_THREADS = None
    tuned = tune_cpu_allocator()
    if compile_cache_dir is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(compile_cache_dir, "inductor"))
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    return ProcessSettings(effective, threads, tuned,
                           os.environ.get("TORCHINDUCTOR_CACHE_DIR") if compile_cache_dir else None,
                           max_image_pixels, openmp)


def apply_torch_threads() -> None:
    """Give torch the thread count a deferred :func:`setup_process` chose; a no-op where none was deferred
    (a library caller's torch keeps its own settings)."""
    global _DEFERRED_TORCH_THREADS
    if _DEFERRED_TORCH_THREADS is not None:
        import torch

        torch.set_num_threads(_DEFERRED_TORCH_THREADS)
        _DEFERRED_TORCH_THREADS = None
