"""Graph capture for fixed input shapes: CUDA graphs, the NPU's graphs, or ``torch.accelerator.Graph``.

:func:`graph_factory` says how to capture on a device (None where it cannot):
each capture runs on that device's own capture stream (never a process-wide one
that belongs to whichever device captured first) and allocates from one memory
pool shared by every graph of the device, where the backend has pools.

:class:`GraphCache` decides which shapes are captured: a shape is captured on
its second sight, shapes prepared at warm-up (:meth:`GraphCache.prepare`) are
never evicted, and a shape evicted once must prove hot again before it is
captured again, so a rotation of more shapes than it keeps cannot turn every
call into a capture. After :meth:`GraphCache.seal` nothing outside the prepared
set is captured (a service captures at warm-up, never inside a request).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from modnet_npu.errors import ModnetError
from modnet_npu.runtime import devices

Forward = Callable[[torch.Tensor], torch.Tensor]
Log = Callable[[str], None]
GRAPH_PIECE = "graph capture"


class FastPathError(ModnetError, RuntimeError):
    """A fast-path option this device or installation cannot honour."""


def _quiet(message: str) -> None:
    """The default log: says nothing."""


@dataclass
class Captured:
    """A captured forward: copy into ``static_in``, call ``replay``, read ``static_out``.

    ``graph`` keeps the graph object alive as long as its static tensors are used.
    """

    static_in: torch.Tensor
    static_out: torch.Tensor
    replay: Callable[[], None]
    graph: Any = None


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


class DeviceGraphs:
    """Captures on one device with a CUDA-like module (``torch.cuda``, ``torch.npu``).

    The capture stream is this device's own: ``torch.cuda.graph`` (and torch_npu's
    copy of it) otherwise uses one class-wide stream made on whichever device was
    current at the first capture, and a later capture on another device fails.
    Every graph allocates from one pool (``graph_pool_handle``), so the graphs of
    a shape set share their activations' memory instead of holding one pool each.
    Sharing is safe here because :class:`GraphCache` replays one graph at a time
    and copies each output out before the next replay can reuse its memory.
    """

    def __init__(self, mod: Any, graph_cls: Any, device: Any) -> None:
        self.mod, self.graph_cls, self.device = mod, graph_cls, device
        self.stream: Any = None
        self.pool: Any = None
        self.pool_kind = "shared" if hasattr(mod, "graph_pool_handle") else "per graph"

    def __call__(self, fn: Forward, static_in: torch.Tensor) -> Captured:
        mod, index = self.mod, self.device.index
        with devices.current(self.device):  # streams and pools belong to the current device
            if self.stream is None:
                self.stream = mod.Stream(index)
            if self.pool is None and self.pool_kind == "shared":
                self.pool = mod.graph_pool_handle()
            previous = mod.current_stream(index)
            # warm up on the capture stream first: lazy initialisations must not land in the graph
            self.stream.wait_stream(previous)  # the input was written on the current stream
            with mod.stream(self.stream):
                for _ in range(2):
                    fn(static_in)
            previous.wait_stream(self.stream)
            graph = self.graph_cls()
            try:
                out = _record(lambda g: mod.graph(g, pool=self.pool, stream=self.stream), graph, fn, static_in)
            except Exception:
                # torch_npu's graph.__enter__ switches to its capture stream before capture_begin,
                # and its __exit__ never runs when capture_begin raises: put the stream back
                mod.set_stream(previous)
                raise
        return Captured(static_in, out, graph.replay, graph)


class AcceleratorGraphs:
    """Captures with ``torch.accelerator.Graph`` (absent in torch 2.9.0, present in 2.13): one stream per
    device; the first graph's pool is shared by the later ones (``Graph(pool=first.pool())``)."""

    pool_kind = "shared"

    def __init__(self, device: Any) -> None:
        self.device = device
        self.stream: Any = None
        self.pool: Any = None

    def __call__(self, fn: Forward, static_in: torch.Tensor) -> Captured:
        device = self.device
        with devices.current(device):
            if self.stream is None:
                self.stream = torch.Stream(device)
            previous = torch.accelerator.current_stream(device)
            self.stream.wait_stream(previous)
            with self.stream:
                for _ in range(2):
                    fn(static_in)
            previous.wait_stream(self.stream)
            graph = torch.accelerator.Graph(pool=self.pool)
            with self.stream:  # capture needs a non-default stream; the with restores the current one
                out = _record(lambda g: g, graph, fn, static_in)
            if self.pool is None:
                self.pool = graph.pool()
        return Captured(static_in, out, graph.replay, graph)


def graph_factory(device: Any) -> DeviceGraphs | AcceleratorGraphs | None:
    """How to capture graphs on ``device``, or None where it cannot (CPU, MPS, old stacks)."""
    if device.type == "cuda":
        return DeviceGraphs(torch.cuda, torch.cuda.CUDAGraph, device)
    if device.type == "npu":
        mod = getattr(torch, "npu", None)
        if mod is not None and hasattr(mod, "NPUGraph") and hasattr(mod, "graph"):
            return DeviceGraphs(mod, mod.NPUGraph, device)
        # a torch_npu without NPUGraph on a torch that has the generic graph API
        if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "Graph"):
            return AcceleratorGraphs(device)
    return None


def shape_text(key: tuple) -> str:
    """``NxCxHxW dtype`` of a cache key (shape, dtype, ...)."""
    shape, dtype = key[0], key[1]
    return "x".join(str(d) for d in shape) + " " + str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class GraphCounts:
    """What a :class:`GraphCache` did: captures (``recaptures`` of them of shapes captured before),
    ``evictions``, ``replays``, ``eager_runs`` (calls that ran eagerly), graphs ``held`` now of ``max_graphs``
    (``pinned``: prepared at warm-up), the ``pool`` (shared or per graph)."""

    captures: int
    recaptures: int
    evictions: int
    replays: int
    eager_runs: int
    held: int
    pinned: int
    max_graphs: int
    pool: str


class GraphCache:
    """Replays captured graphs for input shapes seen before; runs eagerly otherwise.

    A shape is captured the ``capture_after``-th time it is seen, so one-off sizes
    (a folder of photos of every aspect) never pay for a capture, while video
    frames and same-size folders replay. At most ``max_graphs`` shapes are kept
    besides those prepared at warm-up (pinned, never evicted), least recently
    used first out. A shape evicted ``k`` times is captured again only after
    ``capture_after * 2**k`` sightings since its eviction: a rotation of more
    shapes than are kept settles instead of recapturing at every call (6 shapes
    in rotation over 4 places, 10 rounds: 10 captures, not 54), and the
    recaptures of a shape grow with the log of its calls. A shape whose capture
    fails runs eagerly from then on, its reason kept in ``failed`` and logged
    once; with ``strict`` (``--graphs on``) a failed capture raises FastPathError
    instead. An input the eager forward refuses too (a wrong size) raises the
    forward's own error: it is the input's fault, not the capture's.
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
        self.pinned: set[tuple] = set()
        self.seen: dict[tuple, int] = {}  # sightings since the shape's last eviction
        self.evicted: dict[tuple, int] = {}  # times each shape was evicted
        self.failed: dict[tuple, str] = {}
        self.outside: set[tuple] = set()  # shapes run eagerly after sealing
        self.sealed = False
        self.captures = self.recaptures = self.evictions = self.replays = self.eager_runs = 0
        self._lock = threading.Lock()  # a replay, its input copy and its output copy are one step

    @staticmethod
    def key(x: torch.Tensor) -> tuple:
        return (tuple(x.shape), x.dtype, str(x.device))

    def _capture(self, key: tuple, x: torch.Tensor) -> tuple[Captured | None, torch.Tensor | None]:
        """(the capture, None), or (None, the eager result) when the capture failed."""
        try:
            return self.factory(self.fn, x.clone()), None
        except Exception as exc:  # an operator that cannot be captured, or an input nothing can run
            reason = devices.one_line(exc)
            out = self.fn(x)  # raises the forward's own error when the input is at fault
            if self.strict:
                raise FastPathError(f"--graphs on: graph capture failed for input {shape_text(key)} ({reason}); "
                                    "run with --graphs auto (that shape then runs eagerly) or off") from exc
            if reason not in self.failed.values():  # once per reason, not once per shape
                self.log(f"graph capture failed for input {shape_text(key)}, running it eagerly: {reason}")
            self.failed[key] = reason
            return None, out

    def _admit(self, key: tuple, entry: Captured) -> None:
        self.captures += 1
        if key in self.evicted:
            self.recaptures += 1
        self.graphs[key] = entry
        unpinned = [k for k in self.graphs if k not in self.pinned]  # least recently used first
        for victim in unpinned[: max(0, len(unpinned) - self.max_graphs)]:
            del self.graphs[victim]
            self.evicted[victim] = self.evicted.get(victim, 0) + 1
            self.seen[victim] = 0
            self.evictions += 1

    def _wants_capture(self, key: tuple) -> bool:
        if key in self.failed:
            return False
        if self.sealed:
            if key not in self.outside:
                self.outside.add(key)
                self.log(f"input {shape_text(key)} is outside the prepared shape set: it runs eagerly")
            return False
        self.seen[key] = self.seen.get(key, 0) + 1
        return self.seen[key] >= self.capture_after * 2 ** self.evicted.get(key, 0)

    def _replay(self, entry: Captured, x: torch.Tensor) -> torch.Tensor:
        entry.static_in.copy_(x)
        entry.replay()
        self.replays += 1
        return entry.static_out.clone()  # the caller owns its result; the next replay overwrites static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.factory is None:
            return self.fn(x)
        key = self.key(x)
        with self._lock:
            entry = self.graphs.get(key)
            if entry is None:
                if not self._wants_capture(key):
                    self.eager_runs += 1
                    return self.fn(x)
                entry, out = self._capture(key, x)
                if entry is None:
                    self.eager_runs += 1
                    return out
                self._admit(key, entry)
            self.graphs.move_to_end(key)
            return self._replay(entry, x)

    def prepare(self, x: torch.Tensor) -> bool:
        """Capture ``x``'s shape now and keep it for good (warm-up); False when its capture failed (auto)."""
        if self.factory is None:
            return False
        key = self.key(x)
        with self._lock:
            if key not in self.graphs:
                entry, _ = self._capture(key, x)
                if entry is None:
                    return False
                self.pinned.add(key)
                self._admit(key, entry)
            self.pinned.add(key)
            self._replay(self.graphs[key], x)  # one replay: the graph runs before a request needs it
        return True

    def seal(self) -> None:
        """From now on only prepared (or already captured) shapes replay; others run eagerly, logged once each."""
        self.sealed = True

    def prepared_batches(self, tail: tuple, dtype: torch.dtype) -> set[int]:
        """Batch sizes held for inputs of shape ``(N, *tail)`` and ``dtype``."""
        return {k[0][0] for k in self.graphs if k[0][1:] == tail and k[1] == dtype}

    def counts(self) -> GraphCounts:
        return GraphCounts(self.captures, self.recaptures, self.evictions, self.replays, self.eager_runs,
                           len(self.graphs), len(self.pinned), self.max_graphs,
                           getattr(self.factory, "pool_kind", "per graph"))

    def describe(self) -> str:
        """``graph capture``, saying so when captures failed and shapes ran eagerly."""
        if not self.failed:
            return GRAPH_PIECE
        if self.captures == 0:
            return f"{GRAPH_PIECE} failed (eager)"
        return f"{GRAPH_PIECE} ({len(self.failed)} shape(s) eager: capture failed)"

    def failures(self) -> dict[str, str]:
        """Input ``shape dtype`` -> why its capture failed."""
        return {shape_text(k): v for k, v in self.failed.items()}
