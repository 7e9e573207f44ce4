"""Ways to run a MODNet module faster, whatever the device: graph capture for
fixed shapes (CUDA graphs, the NPU's graphs, or ``torch.accelerator.Graph``:
``runtime.graphs``), compilation (AOTInductor packages cached on disk; torchair
on NPU: ``runtime.compiled``), and batch-parallel execution on CPUs.

:func:`make_runner` puts them together; each piece also stands alone, and
:meth:`Runner.stats` says what each did (captures, evictions, replays, failures
with their reasons, compilations, the shapes prepared at warm-up and what that
cost). Graphs and compiled code are made for fixed shapes: :meth:`Runner.prepare`
makes a shape ready (at warm-up), :meth:`Runner.seal` stops anything from being
captured or compiled later (a request then never waits for a compiler). Device
specifics come from ``devices``; everything here takes a ``torch.device`` (or
anything with its ``type`` and ``index``).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from modnet_npu.runtime import devices
from modnet_npu.runtime.compiled import (  # noqa: F401  (re-exported: the fast path's one import)
    DEFAULT_COMPILE_CACHE,
    AotCompiled,
    TorchairCompiled,
    architecture,
    check_toolchain,
    compile_model,
    cpp_compiler,
    cuda_toolkit,
    torchair_backend,
    model_digest,
)
from modnet_npu.runtime.graphs import (  # noqa: F401  (re-exported)
    GRAPH_PIECE,
    AcceleratorGraphs,
    Captured,
    DeviceGraphs,
    FastPathError,
    Forward,
    GraphCache,
    GraphFactory,
    Log,
    _quiet,
    _record,
    graph_factory,
    shape_text,
)

GRAPH_MODES = ("auto", "on", "off")
# The batch sizes a fixed-shape fast path is prepared for: a batch is padded up to the next one (rows of
# zeros, dropped from the answer) and a larger one is cut into batches of the largest, so the device sees a
# handful of shapes per model input size instead of one per batch length.
BATCH_SIZES = (1, 2, 4, 8)


def batch_set(max_batch: int) -> tuple[int, ...]:
    """The batch sizes prepared for batches of up to ``max_batch``: :data:`BATCH_SIZES` below it, then
    ``max_batch`` itself (or the largest of :data:`BATCH_SIZES` when it is larger: bigger batches are cut)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    top = min(max_batch, BATCH_SIZES[-1])
    return tuple(b for b in BATCH_SIZES if b < top) + (top,)


# --------------------------------------------------------------------------
# CPU: images of a batch in parallel
# --------------------------------------------------------------------------


class BatchParallel:
    """Split a batch over worker threads, each with its share of the cores.

    On a few CPU cores, MODNet's small and depthwise convolutions scale poorly
    across threads; independent images scale well. Measured on the 2-core
    development machine at 512x512 (benchmark.py batch), this makes a batch
    cheaper per image than single images, where one large batch is not.
    """

    def __init__(self, fn: Forward, threads: int) -> None:
        self.fn = fn
        self.workers = max(1, threads)
        # one intra-op thread per worker (a per-thread setting under OpenMP)
        self.pool = (ThreadPoolExecutor(self.workers, initializer=torch.set_num_threads, initargs=(1,))
                     if self.workers > 1 else None)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # thread-local: each worker enters it itself
            return self.fn(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is None or x.shape[0] < 2:
            return self.fn(x)
        # one image per task: a worker with one core keeps a single image's
        # activations in cache, which a sub-batch would not
        return torch.cat(list(self.pool.map(self._run, x.split(1))))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


# --------------------------------------------------------------------------
# all together
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """One shape made ready at warm-up: ``how`` (compiled, loaded from the cache, captured, or eager where
    the fast path has no fixed shapes or its capture failed) and the ``seconds`` it took."""

    shape: str
    how: str
    seconds: float


@dataclass(frozen=True)
class FastPathStats:
    """What the fast path did so far: the report's ``fast_path_details``.

    ``captures`` / ``replays``: graphs captured and replayed; ``recaptures``: captures
    of shapes captured (and evicted) before; ``evictions``; ``eager_runs``: calls the
    graph cache ran eagerly; ``graphs_held`` of ``max_graphs`` (besides the prepared
    ones); ``graph_pool``: ``shared`` (one memory pool for every graph of the device)
    or ``per graph``; ``capture_failures``: input ``shape dtype`` -> why its capture
    failed (that shape ran eagerly); ``capture_blocked``: why capture was not tried at
    all; ``compiled_now`` / ``compiled_from_cache``: input shapes compiled in this
    process / loaded from the compile cache; ``compiled_stale``: cached packages that
    could not be used and were compiled again. ``batch_sizes``: what batches are
    padded up to (empty where the fast path takes any shape as it comes);
    ``prepared``: the shapes made ready at warm-up, which took ``warm_up_s`` and
    ``warm_up_memory_mb`` (device memory held afterwards on an accelerator, the
    process's resident memory on a CPU: ``warm_up_memory``); ``sealed``: shapes
    outside that set run eagerly (``outside_set``: those seen so far).
    """

    pieces: tuple[str, ...]
    describe: str
    captures: int = 0
    replays: int = 0
    capture_failures: dict[str, str] = field(default_factory=dict)
    capture_blocked: str | None = None
    compiled_now: int = 0
    compiled_from_cache: int = 0
    compiled_stale: int = 0
    recaptures: int = 0
    evictions: int = 0
    eager_runs: int = 0
    graphs_held: int = 0
    max_graphs: int = 0
    graph_pool: str | None = None
    batch_sizes: tuple[int, ...] = ()
    prepared: tuple[Prepared, ...] = ()
    warm_up_s: float = 0.0
    warm_up_memory_mb: float | None = None
    warm_up_memory: str | None = None
    sealed: bool = False
    outside_set: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("pieces", "batch_sizes", "outside_set", "prepared"):
            d[name] = list(d[name])
        return d


def memory_now(device: Any) -> tuple[float | None, str]:
    """(memory now, what it is): allocated device memory on an accelerator, resident memory on a CPU."""
    if device is not None and device.type in ("cuda", "npu"):
        return devices.allocated_mb(device), "device memory allocated"
    return devices.process_rss_mb()[0], "process resident memory"


@dataclass
class Runner:
    """Callable fast path over a model; ``describe`` says which pieces are on, :meth:`stats` what they did."""

    forward: Forward
    pieces: tuple[str, ...]
    graphs: GraphCache | None = None
    parallel: BatchParallel | None = None
    compiled: AotCompiled | TorchairCompiled | None = None
    device: Any = None
    capture_blocked: str | None = None
    batch_sizes: tuple[int, ...] = ()
    prepared: list[Prepared] = field(default_factory=list)
    warm_up_memory: tuple[float | None, str] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the current device is per thread: a service's worker threads did not run activate
        with torch.inference_mode(), devices.current(self.device):
            return self.forward(x)

    @property
    def fixed_shapes(self) -> bool:
        """Whether the fast path is made per input shape (compiled or captured), so that shapes should be few."""
        return self.compiled is not None or self.graphs is not None

    @property
    def sealed(self) -> bool:
        part = self.compiled or self.graphs
        return bool(part is not None and part.sealed)

    def prepare(self, x: torch.Tensor) -> Prepared:
        """Make ``x``'s shape ready now (compile or load it, capture it), outside any timing or request."""
        start = time.perf_counter()
        key = GraphCache.key(x)
        with torch.inference_mode(), devices.current(self.device):
            if self.compiled is not None:
                before = self.compiled.from_cache
                self.compiled.prepare(x)  # runs it once: a package that cannot run is found now
                how = "loaded" if self.compiled.from_cache > before else "compiled"
            elif self.graphs is not None:
                how = "captured" if self.graphs.prepare(x) else "eager (capture failed)"
            else:
                self.forward(x)
                how = "eager"
            if self.device is not None:
                devices.synchronize(self.device)
        done = Prepared(shape_text(key), how, time.perf_counter() - start)
        self.prepared.append(done)
        return done

    def seal(self) -> None:
        """No capture or compilation from now on: shapes not prepared run eagerly (each logged once)."""
        for part in (self.compiled, self.graphs):
            if part is not None:
                part.seal()

    def prepared_batches(self, tail: tuple, dtype: torch.dtype) -> set[int]:
        """Batch sizes ready (compiled or captured) for inputs ``(N, *tail)`` of ``dtype``."""
        part = self.compiled or self.graphs
        return part.prepared_batches(tail, dtype) if part is not None else set()

    @property
    def describe(self) -> str:
        pieces = [self.graphs.describe() if p == GRAPH_PIECE and self.graphs is not None else p
                  for p in self.pieces]
        return ", ".join(pieces) or "eager"

    def _warm_up_fields(self) -> dict[str, Any]:
        memory, kind = self.warm_up_memory or (None, None)
        outside = set()
        for part in (self.compiled, self.graphs):
            outside |= getattr(part, "outside", set())
        return {"batch_sizes": self.batch_sizes, "prepared": tuple(self.prepared),
                "warm_up_s": round(sum(p.seconds for p in self.prepared), 3), "warm_up_memory_mb": memory,
                "warm_up_memory": kind, "sealed": self.sealed,
                "outside_set": tuple(sorted(shape_text(k) for k in outside))}

    def stats(self) -> FastPathStats:
        g, c = self.graphs, self.compiled
        counts = {}
        if g is not None:
            n = g.counts()
            counts = {"captures": n.captures, "replays": n.replays, "recaptures": n.recaptures,
                      "evictions": n.evictions, "eager_runs": n.eager_runs, "graphs_held": n.held,
                      "max_graphs": n.max_graphs, "graph_pool": n.pool, "capture_failures": g.failures()}
        if c is not None:
            counts |= {"compiled_now": c.compiled_now, "compiled_from_cache": c.from_cache,
                       "compiled_stale": c.stale}
        return FastPathStats(self.pieces, self.describe, capture_blocked=self.capture_blocked,
                             **counts, **self._warm_up_fields())

    def close(self) -> None:
        """Shut the CPU worker threads down (the runner still works, serially)."""
        if self.parallel is not None:
            self.parallel.close()


def _graph_cache(fn: Forward, device: Any, graphs: str, max_graphs: int, log: Log,
                 factory: GraphFactory | None = None) -> tuple[GraphCache | None, str | None]:
    """The graph cache ``graphs`` asks for, or (None, why not) where capture cannot work."""
    factory = factory or graph_factory(device)
    if factory is None:
        if graphs == "on":
            raise FastPathError(f"graph capture is not available on {device.type}")
        return None, None
    blocked = devices.graph_capture_blocker(device)
    if blocked:
        if graphs == "on":
            raise FastPathError(f"--graphs on: {blocked}")
        log(f"graph capture off: {blocked}")
        return None, blocked
    return GraphCache(fn, factory, max_graphs, strict=graphs == "on", log=log), None


def make_runner(
    model: nn.Module,
    device: Any,
    compile: bool = False,
    graphs: str = "auto",
    threads: int = 0,
    max_graphs: int = 4,
    cache_dir: str = DEFAULT_COMPILE_CACHE,
    log: Log = _quiet,
    *,
    capture: GraphFactory | None = None,
) -> Runner:
    """The fastest way to call ``model`` on ``device`` that the options allow.

    ``graphs``: ``auto`` captures where the device can (a failed capture is
    logged and its shape runs eagerly), ``on`` insists (FastPathError with the
    reason when a capture fails or cannot be tried), ``off`` never. Graph
    capture and ``compile`` do not stack (the compiled model manages its own
    launches). ``capture``: how to capture where the device has no graphs of its
    own (a stand-in: tests run the graph cache on the CPU with it). The device
    should have been through ``devices.activate``.
    """
    if graphs not in GRAPH_MODES:
        raise ValueError(f"unknown graphs mode {graphs!r}; choose from {', '.join(GRAPH_MODES)}")
    fn: Forward = model
    pieces: list[str] = []
    compiled = None
    if compile:
        fn = compiled = compile_model(model, device, cache_dir, log)
        pieces.append("compiled")
    cache, blocked = None, None
    if graphs != "off" and not compile:
        cache, blocked = _graph_cache(fn, device, graphs, max_graphs, log, capture)
    if cache is not None:
        fn = cache
        pieces.append(GRAPH_PIECE)
    parallel = None
    if device.type == "cpu" and threads > 1 and not compile:
        fn = parallel = BatchParallel(fn, threads)
        pieces.append(f"batch-parallel x{threads}")
    return Runner(fn, tuple(pieces), cache, parallel, compiled, device, blocked)
