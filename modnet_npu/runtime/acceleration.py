"""Ways to run a MODNet module faster, whatever the device: graph capture for
fixed shapes (CUDA graphs, the NPU's graphs, or ``torch.accelerator.Graph``),
compilation (AOTInductor packages cached on disk; torchair on NPU), and
batch-parallel execution on CPUs.

:func:`make_runner` puts them together; each piece also stands alone, and
:meth:`Runner.stats` says what each did (captures, replays, failures with their
reasons, compilations). Device specifics come from ``devices``; everything here
takes a ``torch.device`` (or anything with its ``type`` and ``index``).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from modnet_npu.runtime import devices
from modnet_npu.errors import ModnetError
from modnet_npu.fileio import atomic_path
from modnet_npu.source.resolve import DEFAULT_MODELS_DIR

Forward = Callable[[torch.Tensor], torch.Tensor]
Log = Callable[[str], None]
DEFAULT_COMPILE_CACHE = os.path.join(DEFAULT_MODELS_DIR, ".compile-cache")
GRAPH_MODES = ("auto", "on", "off")
GRAPH_PIECE = "graph capture"


class FastPathError(ModnetError, RuntimeError):
    """A fast-path option this device or installation cannot honour."""


def _quiet(message: str) -> None:
    """The default log: says nothing."""


# --------------------------------------------------------------------------
# graph capture
# --------------------------------------------------------------------------


@dataclass
class Captured:
    static_in: torch.Tensor
    static_out: torch.Tensor
    replay: Callable[[], None]


GraphFactory = Callable[[Forward, torch.Tensor], Captured]


def _record(graph_ctx: Callable[[Any], Any], graph: Any, fn: Forward, static_in: torch.Tensor) -> torch.Tensor:
    """``fn(static_in)`` under capture into ``graph``.

    When the body fails, ending the capture usually fails too (the capture is
    invalidated); the body's error is the one that names the cause, so it wins.
    """
    body_error: Exception | None = None
    out = None
    try:
        with graph_ctx(graph):
            try:
                out = fn(static_in)
            except Exception as exc:
                body_error = exc
    except Exception:
        if body_error is None:
            raise
    if body_error is not None:
        raise body_error
    return out


def _capture_with(mod: Any, graph_cls: Any, graph_ctx: Any, device: Any, fn: Forward,
                  static_in: torch.Tensor) -> Captured:
    """Capture on ``device`` with a CUDA-like module (``torch.cuda``, ``torch.npu``)."""
    with devices.current(device):  # streams and the capture stream belong to the current device
        previous = mod.current_stream(device.index)
        # warm up on a side stream first: lazy initialisations must not land in the graph
        side = mod.Stream(device.index)
        side.wait_stream(previous)
        with mod.stream(side):
            for _ in range(2):
                fn(static_in)
        previous.wait_stream(side)
        graph = graph_cls()
        try:
            out = _record(graph_ctx, graph, fn, static_in)
        except Exception:
            # torch_npu's graph.__enter__ switches to its capture stream before capture_begin,
            # and its __exit__ never runs when capture_begin raises: put the stream back
            mod.set_stream(previous)
            raise
    return Captured(static_in, out, graph.replay)


def _capture_accelerator(device: Any, fn: Forward, static_in: torch.Tensor) -> Captured:
    """Capture with ``torch.accelerator.Graph`` (absent in torch 2.9.0, present in 2.13)."""
    with devices.current(device):
        previous = torch.accelerator.current_stream(device)
        side = torch.Stream(device)
        side.wait_stream(previous)  # the input was written on the current stream
        with side:
            for _ in range(2):
                fn(static_in)
        previous.wait_stream(side)
        graph = torch.accelerator.Graph()
        with torch.Stream(device):  # capture needs a non-default stream; the with restores the current one
            out = _record(lambda g: g, graph, fn, static_in)
    return Captured(static_in, out, graph.replay)


def graph_factory(device: Any) -> GraphFactory | None:
    """How to capture graphs on ``device``, or None where it cannot (CPU, MPS, old stacks)."""
    if device.type == "cuda":
        mod = torch.cuda
        return lambda fn, x: _capture_with(mod, mod.CUDAGraph, mod.graph, device, fn, x)
    if device.type == "npu":
        mod = getattr(torch, "npu", None)
        if mod is not None and hasattr(mod, "NPUGraph") and hasattr(mod, "graph"):
            return lambda fn, x: _capture_with(mod, mod.NPUGraph, mod.graph, device, fn, x)
        # a torch_npu without NPUGraph on a torch that has the generic graph API
        if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "Graph"):
            return functools.partial(_capture_accelerator, device)
    return None


def _shape_text(key: tuple) -> str:
    shape, dtype = key[0], key[1]
    return "x".join(str(d) for d in shape) + " " + str(dtype).removeprefix("torch.")


class GraphCache:
    """Replays captured graphs for input shapes seen before; runs eagerly otherwise.

    A shape is captured the second time it is seen, so one-off sizes (a folder of
    photos of every aspect) never pay for a capture, while video frames and
    same-size folders replay. At most ``max_graphs`` shapes are kept, least
    recently used first out. A shape whose capture fails runs eagerly from then
    on, its reason kept in ``failed`` and logged once; with ``strict`` (``--graphs
    on``) a failed capture raises FastPathError instead.
    """

    def __init__(self, fn: Forward, factory: GraphFactory | None, max_graphs: int = 4, capture_after: int = 2,
                 *, strict: bool = False, log: Log = _quiet) -> None:
        self.fn = fn
        self.factory = factory
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.strict = strict
        self.log = log
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.failed: dict[tuple, str] = {}
        self.captures = 0
        self.replays = 0

    def _capture(self, key: tuple, x: torch.Tensor) -> Captured | None:
        try:
            return self.factory(self.fn, x.clone())
        except Exception as exc:  # an operator that cannot be captured
            reason = devices.one_line(exc)
            if self.strict:
                raise FastPathError(f"--graphs on: graph capture failed for input {_shape_text(key)} ({reason}); "
                                    "run with --graphs auto (that shape then runs eagerly) or off") from exc
            if reason not in self.failed.values():  # once per reason, not once per shape
                self.log(f"graph capture failed for input {_shape_text(key)}, running it eagerly: {reason}")
            self.failed[key] = reason
            return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.factory is None:
            return self.fn(x)
        key = (tuple(x.shape), x.dtype, str(x.device))
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if key in self.failed or self.seen[key] < self.capture_after:
                return self.fn(x)
            entry = self._capture(key, x)
            if entry is None:
                return self.fn(x)
            self.captures += 1
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        entry.static_in.copy_(x)
        entry.replay()
        self.replays += 1
        return entry.static_out.clone()

    def describe(self) -> str:
        """``graph capture``, saying so when captures failed and shapes ran eagerly."""
        if not self.failed:
            return GRAPH_PIECE
        if self.captures == 0:
            return f"{GRAPH_PIECE} failed (eager)"
        return f"{GRAPH_PIECE} ({len(self.failed)} shape(s) eager: capture failed)"

    def failures(self) -> dict[str, str]:
        """Input ``shape dtype`` -> why its capture failed."""
        return {_shape_text(k): v for k, v in self.failed.items()}


# --------------------------------------------------------------------------
# compilation
# --------------------------------------------------------------------------


def weights_digest(model: nn.Module) -> str:
    """A short hash of a model's tensors and their names: the cache key of its compiled forms."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use (the first of its ``cpp.cxx`` list found on PATH), or None."""
    from torch._inductor import config

    cxx = config.cpp.cxx
    for name in cxx if isinstance(cxx, (list, tuple)) else (cxx,):
        if name and shutil.which(name):  # None stands for a conda-installed g++, off by default
            return name
    return None


class AotCompiled:
    """``model`` compiled ahead of time by AOTInductor, one package per input shape.

    Packages (``.pt2``) are written to ``cache_dir`` under a name made of the
    weights' hash, the device, the shape, the dtype and the torch version, so a
    later run loads the compiled kernels in a second or two instead of compiling
    again (a minute or more on two CPU cores). Inductor's freezing makes the
    weights constants, folded and pre-packed for the device's kernels.
    """

    def __init__(self, model: nn.Module, device: Any, cache_dir: str, log: Log = _quiet) -> None:
        self.model, self.device, self.cache_dir, self.log = model, device, cache_dir, log
        self.digest = weights_digest(model)
        self.loaded: dict[tuple, Callable] = {}
        self.compiled_now = 0
        self.from_cache = 0

    def package_path(self, x: torch.Tensor) -> str:
        shape = "x".join(str(d) for d in x.shape)
        dtype = str(x.dtype).removeprefix("torch.")
        version = torch.__version__.replace("+", "_")
        return os.path.join(self.cache_dir, f"modnet-{self.digest}-{self.device.type}-{shape}-{dtype}-torch{version}.pt2")

    def _compile(self, x: torch.Tensor, path: str) -> None:
        self.log(f"compiling for input {tuple(x.shape)} (once; cached in {self.cache_dir})")
        try:
            with torch.inference_mode():
                program = torch.export.export(self.model, (x,))
            with atomic_path(path) as tmp:
                torch._inductor.aoti_compile_and_package(program, package_path=tmp,
                                                         inductor_configs={"freezing": True})
        except Exception as exc:  # inductor's errors carry the whole build log
            raise FastPathError(f"--compile: compiling for input {tuple(x.shape)} failed ({devices.one_line(exc)}); "
                                "run without --compile") from exc
        self.compiled_now += 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        fn = self.loaded.get(key)
        if fn is None:
            path = self.package_path(x)
            if os.path.exists(path):
                self.from_cache += 1
            else:
                self._compile(x, path)
            index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
            fn = torch._inductor.aoti_load_package(path, device_index=index)
            self.loaded[key] = fn
        return fn(x)


class TorchairCompiled:
    """``torch.compile`` with torchair's NPU backend; compilation happens at the first call per shape."""

    from_cache = 0  # torchair keeps no compiled forms between runs here

    def __init__(self, model: nn.Module, backend: Callable) -> None:
        self.fn = torch.compile(model, backend=backend, dynamic=False)
        self.shapes: set[tuple] = set()

    @property
    def compiled_now(self) -> int:
        return len(self.shapes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key in self.shapes:
            return self.fn(x)
        try:
            out = self.fn(x)
        except Exception as exc:  # dynamo and GE errors run to pages
            inner = getattr(exc, "inner_exception", None) or exc  # dynamo's BackendCompilerFailed wraps the cause
            raise FastPathError(f"--compile: torchair compilation for input {tuple(x.shape)} failed "
                                f"({devices.one_line(inner)}); run without --compile") from exc
        self.shapes.add(key)
        return out


def torchair_backend() -> Callable:
    """torchair's NPU backend for ``torch.compile``; FastPathError (one line) when torchair cannot load.

    torch_npu installs a lazy ``torchair`` module: ``import torchair`` succeeds
    even when torchair cannot load, and the first attribute access raises
    torch_npu's ``_TorchairImportError`` (an ``Exception``, not an ``ImportError``,
    chained from the real cause). So the import, the config and the backend are
    guarded together, and the message names the cause.
    """
    try:
        import torchair

        config = torchair.CompilerConfig()
        return torchair.get_npu_backend(compiler_config=config)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise FastPathError(
            f"--compile on NPU needs torchair, which did not load ({devices.one_line(cause)}); torchair in torch_npu "
            "2.9.0 and 2.9.0.post1 needs pip install 'setuptools<82' protobuf (later ones: protobuf packaging), "
            "or run without --compile") from None


def compile_model(model: nn.Module, device: Any, cache_dir: str = DEFAULT_COMPILE_CACHE,
                  log: Log = _quiet) -> AotCompiled | TorchairCompiled:
    """Compile for inference: AOTInductor packages on CPU/CUDA (cached), torchair on NPU."""
    if device.type == "npu":
        return TorchairCompiled(model, torchair_backend())
    if device.type not in ("cpu", "cuda"):
        raise FastPathError(f"--compile is not supported on {device.type}; run without it")
    if cpp_compiler() is None:
        where = "the CPU" if device.type == "cpu" else "CUDA (AOTInductor's wrapper)"
        raise FastPathError(f"--compile on {where} needs a C++ compiler (g++); install it (apt-get install g++) "
                            "or run without --compile")
    os.makedirs(cache_dir, exist_ok=True)
    return AotCompiled(model, device, cache_dir, log)


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
class FastPathStats:
    """What the fast path did so far: the report's ``fast_path_details``.

    ``captures`` / ``replays``: graphs captured and replayed; ``capture_failures``:
    input ``shape dtype`` -> why its capture failed (that shape ran eagerly);
    ``capture_blocked``: why capture was not tried at all; ``compiled_now`` /
    ``compiled_from_cache``: input shapes compiled in this process / loaded
    from the compile cache.
    """

    pieces: tuple[str, ...]
    describe: str
    captures: int = 0
    replays: int = 0
    capture_failures: dict[str, str] = field(default_factory=dict)
    capture_blocked: str | None = None
    compiled_now: int = 0
    compiled_from_cache: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pieces"] = list(self.pieces)
        return d


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the current device is per thread: a service's worker threads did not run activate
        with torch.inference_mode(), devices.current(self.device):
            return self.forward(x)

    @property
    def describe(self) -> str:
        pieces = [self.graphs.describe() if p == GRAPH_PIECE and self.graphs is not None else p
                  for p in self.pieces]
        return ", ".join(pieces) or "eager"

    def stats(self) -> FastPathStats:
        g, c = self.graphs, self.compiled
        return FastPathStats(
            self.pieces, self.describe,
            captures=g.captures if g else 0, replays=g.replays if g else 0,
            capture_failures=g.failures() if g else {}, capture_blocked=self.capture_blocked,
            compiled_now=c.compiled_now if c else 0, compiled_from_cache=c.from_cache if c else 0,
        )

    def close(self) -> None:
        """Shut the CPU worker threads down (the runner still works, serially)."""
        if self.parallel is not None:
            self.parallel.close()


def _graph_cache(fn: Forward, device: Any, graphs: str, max_graphs: int, log: Log
                 ) -> tuple[GraphCache | None, str | None]:
    """The graph cache ``graphs`` asks for, or (None, why not) where capture cannot work."""
    factory = graph_factory(device)
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
) -> Runner:
    """The fastest way to call ``model`` on ``device`` that the options allow.

    ``graphs``: ``auto`` captures where the device can (a failed capture is
    logged and its shape runs eagerly), ``on`` insists (FastPathError with the
    reason when a capture fails or cannot be tried), ``off`` never. Graph
    capture and ``compile`` do not stack (the compiled model manages its own
    launches). The device should have been through ``devices.activate``.
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
        cache, blocked = _graph_cache(fn, device, graphs, max_graphs, log)
    if cache is not None:
        fn = cache
        pieces.append(GRAPH_PIECE)
    parallel = None
    if device.type == "cpu" and threads > 1 and not compile:
        fn = parallel = BatchParallel(fn, threads)
        pieces.append(f"batch-parallel x{threads}")
    return Runner(fn, tuple(pieces), cache, parallel, compiled, device, blocked)
