"""Fakes whose graph replays recompute, for tests of graph capture on machines without a device.

FakeNpu's own NPUGraph.replay (tests/fake_npu.py) records the call and computes nothing, so a cache that
replayed a stale graph (an input never copied in, an output never refreshed) would pass. Here the operators
run during capture are recorded (:class:`OpTape`), with the very tensors they read and wrote, and a replay
runs them again into those same tensors, as a device graph replays its kernels on the memory they were
captured with. A stale input or output then gives a wrong answer, which tests catch.

* :class:`ReplayingFakeNpu`: a :class:`fake_npu.FakeNpu` whose NPUGraph replays for real (same calls
  recorded, same errors).
* :class:`TapeGraphs`: a graph factory for CPU tensors (``acceleration.GraphFactory``), for the graph cache
  and the engine on the CPU.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fake_npu import FakeNpu
from fake_npu_modules import _bind, _NPUGraph


class OpTape(TorchDispatchMode):
    """Records every aten operator run while it is active; :meth:`replay` runs them again, in order, writing
    each result into the tensor the operator produced at capture (views write through to their base)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def replay(self) -> None:
        from torch.utils._pytree import tree_flatten

        for func, args, kwargs, out in self.ops:
            fresh = func(*args, **kwargs)
            for old, new in zip(tree_flatten(out)[0], tree_flatten(fresh)[0]):
                if isinstance(old, torch.Tensor) and old is not new:
                    old.copy_(new)


class _ReplayingNPUGraph(_NPUGraph):
    """NPUGraph whose capture records the operators (:class:`OpTape`) and whose replay reruns them."""

    def capture_begin(self, pool=None, capture_error_mode="global"):
        super().capture_begin(pool, capture_error_mode)
        self.pool_used = pool
        self.tape = OpTape()
        if self._mode is None:  # a capture meant to fail records nothing
            self.tape.__enter__()
            self._fake._active_modes.append(self.tape)

    def capture_end(self):
        tape = getattr(self, "tape", None)
        if tape is not None and tape in self._fake._active_modes:
            tape.__exit__(None, None, None)
            self._fake._active_modes.remove(tape)
        super().capture_end()

    def replay(self):
        super().replay()
        self.tape.replay()


class ReplayingFakeNpu(FakeNpu):
    """A :class:`FakeNpu` whose graphs replay for real (:class:`OpTape`): same calls recorded, same errors."""

    def _build(self) -> None:
        super()._build()
        api = self.npu.graph._api
        bound = _bind(_ReplayingNPUGraph, "NPUGraph", _fake=self, _api=api)
        api.NPUGraph = bound
        api.functions["NPUGraph"] = bound
        self.npu.NPUGraph = bound


class TapeGraphs:
    """A graph factory for CPU tensors (``acceleration.GraphFactory``): captures by recording the forward's
    operators, replays by rerunning them on the captured tensors. ``shapes``: every shape captured, in order;
    ``fail_for``: shapes whose capture raises, as an uncapturable operator would."""

    pool_kind = "shared"

    def __init__(self, fail_for: tuple = ()) -> None:
        self.shapes: list[tuple] = []
        self.fail_for = fail_for

    def __call__(self, fn, static_in):
        from modnet_npu.runtime.graphs import Captured

        if tuple(static_in.shape) in self.fail_for:
            raise RuntimeError("operation not permitted when stream is capturing")
        fn(static_in)  # the warm-up run a real factory makes before capturing
        with OpTape() as tape:
            out = fn(static_in)
        self.shapes.append(tuple(static_in.shape))
        return Captured(static_in, out, tape.replay, tape)
