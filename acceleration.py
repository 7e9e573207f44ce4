"""Ways to run a MODNet module faster, whatever the device: graph capture for
fixed shapes (CUDA graphs, the NPU's graphs, or ``torch.accelerator.Graph``),
compilation (AOTInductor packages cached on disk; torchair on NPU), and
batch-parallel execution on CPUs.

:func:`make_runner` puts them together; each piece also stands alone. Device
specifics come from ``devices``; everything here takes a ``torch.device``.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fileio import atomic_path
from model_source import DEFAULT_MODELS_DIR
from errors import ModnetError

Forward = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_COMPILE_CACHE = os.path.join(DEFAULT_MODELS_DIR, ".compile-cache")


# --------------------------------------------------------------------------
# graph capture
# --------------------------------------------------------------------------


@dataclass
class Captured:
    static_in: torch.Tensor
    static_out: torch.Tensor
    replay: Callable[[], None]


GraphFactory = Callable[[Forward, torch.Tensor], Captured]


def _capture_with(mod, graph_cls, graph_ctx, fn: Forward, static_in: torch.Tensor) -> Captured:
    # warm up on a side stream first: lazy initialisations must not land in the graph
    side = mod.Stream()
    side.wait_stream(mod.current_stream())
    with mod.stream(side):
        for _ in range(2):
            fn(static_in)
    mod.current_stream().wait_stream(side)
    graph = graph_cls()
    with graph_ctx(graph):
        out = fn(static_in)
    return Captured(static_in, out, graph.replay)


def _capture_accelerator(fn: Forward, static_in: torch.Tensor) -> Captured:
    stream = torch.Stream(static_in.device)
    with stream:
        for _ in range(2):
            fn(static_in)
    torch.accelerator.synchronize()
    graph = torch.accelerator.Graph()
    with stream, graph:
        out = fn(static_in)
    return Captured(static_in, out, graph.replay)


def graph_factory(device: torch.device) -> GraphFactory | None:
    """How to capture graphs on ``device``, or None where it cannot (CPU, MPS, old stacks)."""
    if device.type == "cuda":
        mod = torch.cuda
        return lambda fn, x: _capture_with(mod, mod.CUDAGraph, mod.graph, fn, x)
    if device.type == "npu":
        mod = getattr(torch, "npu", None)
        if mod is not None and hasattr(mod, "NPUGraph") and hasattr(mod, "graph"):
            return lambda fn, x: _capture_with(mod, mod.NPUGraph, mod.graph, fn, x)
        if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "Graph"):
            return _capture_accelerator
    return None


class GraphCache:
    """Replays captured graphs for input shapes seen before; runs eagerly otherwise.

    A shape is captured the second time it is seen, so one-off sizes (a folder of
    photos of every aspect) never pay for a capture, while video frames and
    same-size folders replay. At most ``max_graphs`` shapes are kept, least
    recently used first out; a shape whose capture fails runs eagerly from then on.
    """

    def __init__(self, fn: Forward, factory: GraphFactory | None, max_graphs: int = 4, capture_after: int = 2) -> None:
        self.fn = fn
        self.factory = factory
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.failed: dict[tuple, str] = {}
        self.captures = 0
        self.replays = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.factory is None:
            return self.fn(x)
        key = (tuple(x.shape), x.dtype, str(x.device))
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if key in self.failed or self.seen[key] < self.capture_after:
                return self.fn(x)
            try:
                entry = self.factory(self.fn, x.clone())
            except Exception as exc:  # an op that cannot be captured: stay eager for this shape
                self.failed[key] = f"{type(exc).__name__}: {exc}"
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


# --------------------------------------------------------------------------
# compilation
# --------------------------------------------------------------------------


class FastPathError(ModnetError, RuntimeError):
    """A fast-path option this device or installation cannot honour."""



def weights_digest(model: nn.Module) -> str:
    """A short hash of a model's tensors and their names: the cache key of its compiled forms."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class AotCompiled:
    """``model`` compiled ahead of time by AOTInductor, one package per input shape.

    Packages (``.pt2``) are written to ``cache_dir`` under a name made of the
    weights' hash, the device, the shape, the dtype and the torch version, so a
    later run loads the compiled kernels in a second or two instead of compiling
    again (a minute or more on two CPU cores). Inductor's freezing makes the
    weights constants, folded and pre-packed for the device's kernels.
    """

    def __init__(self, model: nn.Module, device: torch.device, cache_dir: str,
                 log: Callable[[str], None] = lambda m: None) -> None:
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        fn = self.loaded.get(key)
        if fn is None:
            path = self.package_path(x)
            if os.path.exists(path):
                self.from_cache += 1
            else:
                self.log(f"compiling for input {tuple(x.shape)} (once; cached in {self.cache_dir})")
                with torch.inference_mode():
                    program = torch.export.export(self.model, (x,))
                with atomic_path(path) as tmp:
                    torch._inductor.aoti_compile_and_package(
                        program, package_path=tmp, inductor_configs={"freezing": True})
                self.compiled_now += 1
            fn = torch._inductor.aoti_load_package(path)
            self.loaded[key] = fn
        return fn(x)


def compile_model(model: nn.Module, device: torch.device, cache_dir: str = DEFAULT_COMPILE_CACHE,
                  log: Callable[[str], None] = lambda m: None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Compile for inference: AOTInductor packages on CPU/CUDA (cached), torchair on NPU."""
    if device.type == "npu":
        try:
            import torchair
        except ImportError:
            raise FastPathError(
                "--compile on NPU needs torchair (shipped with recent torch_npu; pip install torchair)"
            ) from None
        backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
        return torch.compile(model, backend=backend, dynamic=False)
    if device.type not in ("cpu", "cuda"):
        raise FastPathError(f"--compile is not supported on {device.type}; run without it")
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


@dataclass
class Runner:
    """Callable fast path over a model; ``describe`` says which pieces are on."""

    forward: Forward
    pieces: tuple[str, ...]
    graphs: GraphCache | None = None
    parallel: BatchParallel | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.forward(x)

    @property
    def describe(self) -> str:
        return ", ".join(self.pieces) or "eager"

    def close(self) -> None:
        """Shut the CPU worker threads down (the runner still works, serially)."""
        if self.parallel is not None:
            self.parallel.close()


def make_runner(
    model: nn.Module,
    device: torch.device,
    compile: bool = False,
    graphs: str = "auto",
    threads: int = 0,
    max_graphs: int = 4,
    cache_dir: str = DEFAULT_COMPILE_CACHE,
    log: Callable[[str], None] = lambda m: None,
) -> Runner:
    """The fastest way to call ``model`` on ``device`` that the options allow.

    ``graphs``: ``auto`` captures where the device can, ``on`` insists, ``off``
    never. Graph capture and ``compile`` do not stack (the compiled model
    manages its own launches).
    """
    fn: Forward = model
    pieces: list[str] = []
    if compile:
        fn = compile_model(model, device, cache_dir, log)
        pieces.append("compiled")
    cache = None
    factory = graph_factory(device) if graphs != "off" and not compile else None
    if graphs == "on" and factory is None and not compile:
        raise FastPathError(f"graph capture is not available on {device.type}")
    if factory is not None:
        cache = GraphCache(fn, factory, max_graphs)
        fn = cache
        pieces.append("graph capture")
    parallel = None
    if device.type == "cpu" and threads > 1 and not compile:
        fn = parallel = BatchParallel(fn, threads)
        pieces.append(f"batch-parallel x{threads}")
    return Runner(fn, tuple(pieces), cache, parallel)
