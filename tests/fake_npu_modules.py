"""The parts of a fake torch_npu / torch.npu module (tests/fake_npu.py builds them for each FakeNpu)."""
from __future__ import annotations

import os
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from torch.utils._python_dispatch import TorchDispatchMode

from fake_npu_messages import (
    _ALREADY_CAPTURED,
    _CANN_MODULES,
    _DEFAULT_STREAM_CAPTURE,
    _OPTION_VALUES,
    _POOL_WITHOUT_CAPTURE,
    _PTA_VALUE,
    _REPLAY_WITHOUT_CAPTURE,
    TASK_QUEUE_CAPTURE_ERROR,
)

if TYPE_CHECKING:
    from fake_npu import FakeNpu


@dataclass(frozen=True)
class FakeDevice:
    """Stand-in for ``torch.device("npu", index)``, which CPU torch cannot build."""

    index: Optional[int] = 0
    type: str = "npu"

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


def fake_device(index: Optional[int] = 0) -> FakeDevice:
    return FakeDevice(index)



class _FailFirstOp(TorchDispatchMode):
    """Raises ``RuntimeError(message)`` at the first torch op: an aclop met during capture."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise RuntimeError(self.message)


# ---------------------------------------------------------------------------- the fake modules' parts
#
# The classes below are bases: each FakeNpu makes its own subclasses of them (see _bind), named as in
# torch_npu, whose class attributes ``_fake`` (the FakeNpu that records) and ``_api`` (its _NpuApi,
# which holds the stream state) tie them to that FakeNpu.

# the names torch_npu.npu.utils and torch_npu.npu both have, and those only torch_npu.npu has
_UTILS_NAMES = ("synchronize", "set_device", "current_device", "device", "stream", "set_stream", "current_stream",
                "default_stream", "StreamContext", "is_bf16_supported", "get_cann_version")
_NPU_ONLY_NAMES = ("is_available", "device_count", "get_device_name", "get_device_properties", "memory_allocated",
                   "max_memory_allocated", "reset_peak_memory_stats", "empty_cache", "Stream", "Event", "NPUGraph",
                   "graph", "is_current_stream_capturing", "graph_pool_handle", "set_option", "_lazy_init",
                   "is_initialized")


def _bind(base: type, name: str, **attrs: Any) -> type:
    """A subclass of ``base`` called ``name`` with ``attrs`` (``_fake``, ``_api``) as class attributes."""
    return type(name, (base,), {"__doc__": base.__doc__, "__qualname__": name, **attrs})


class _Device:
    """Context manager that makes ``device`` current; no-op for None or a negative index."""

    _fake: FakeNpu

    def __init__(self, device):
        self.idx = self._fake._index(device)
        self.prev_idx = -1

    def __enter__(self):
        fake = self._fake
        fake.record("device.__enter__", self.idx)
        if self.idx < 0:
            return
        self.prev_idx = fake.current
        fake.current = fake._check(self.idx)

    def __exit__(self, *args):
        fake = self._fake
        fake.record("device.__exit__", self.idx)
        if self.idx >= 0 and self.prev_idx >= 0:
            fake.current = self.prev_idx
        return False


class _Event:
    _fake: FakeNpu
    _api: _NpuApi

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.recorded_on = None

    def record(self, stream=None):
        self._fake.record("Event.record", self, stream)
        self.recorded_on = stream if stream is not None else self._api.current_stream_of(self._fake.current)

    def wait(self, stream=None):
        self._fake.record("Event.wait", self, stream)

    def query(self):
        return True

    def synchronize(self):
        self._fake.record("Event.synchronize", self)

    def elapsed_time(self, end_event):
        return 0.0


class _Stream:
    _fake: FakeNpu
    _api: _NpuApi

    def __new__(cls, device=None, priority=0, **kwargs):
        cls._fake.record("Stream", device, priority)
        return cls._api.new_stream(cls, device, priority, kwargs.get("stream_id"))

    @property
    def device(self):
        return FakeDevice(self.device_index)

    def wait_event(self, event):
        self._fake.record("Stream.wait_event", self, event)

    def wait_stream(self, stream):
        self._fake.record("Stream.wait_stream", self, stream)

    def record_event(self, event=None):
        event = event if event is not None else self._api.Event()
        event.record(self)
        return event

    def query(self):
        return True

    def synchronize(self):
        self._fake.record("Stream.synchronize", self)

    def __enter__(self):
        self._ctx = self._api.StreamContext(self)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def __repr__(self):
        return f"<fake torch_npu.npu.Stream device=npu:{self.device_index} npu_stream={self.stream_id}>"


class _StreamContext:
    _fake: FakeNpu
    _api: _NpuApi

    def __init__(self, stream_ctx):
        self.stream = stream_ctx
        self.src_prev_stream = None
        self.dst_prev_stream = None

    def __enter__(self):
        self._fake.record("stream.__enter__", self.stream)
        if self.stream is None:
            return
        self.src_prev_stream = self._api.current_stream_of(self._fake.current)
        self.dst_prev_stream = self._api.current_stream_of(self.stream.device_index)
        self._api.make_current(self.stream)

    def __exit__(self, *exc):
        self._fake.record("stream.__exit__", self.stream)
        if self.stream is None or self.src_prev_stream is None:
            return
        if self.src_prev_stream.device_index != self.stream.device_index:
            self._api.make_current(self.dst_prev_stream)
        self._api.make_current(self.src_prev_stream)


class _NPUGraph:
    _fake: FakeNpu
    _api: _NpuApi

    def __init__(self):
        self.auto_dispatch_capture = False
        self.captured = False
        self.capturing = False
        self.replays = 0
        self._mode: Optional[_FailFirstOp] = None
        self._fake.graphs.append(self)
        self._fake.record("NPUGraph")

    def capture_begin(self, pool=None, capture_error_mode="global"):
        fake = self._fake
        fake.record("NPUGraph.capture_begin", pool, capture_error_mode)
        if os.environ.get("TASK_QUEUE_ENABLE") == "2":
            raise RuntimeError(TASK_QUEUE_CAPTURE_ERROR)
        if self.captured:
            raise RuntimeError(_ALREADY_CAPTURED)
        if self._api.current_stream_of(fake.current).stream_id == 0:
            raise RuntimeError(_DEFAULT_STREAM_CAPTURE)
        if fake.capture_error is not None:
            if fake.capture_error_at == "begin":
                raise RuntimeError(fake.capture_error)
            self._mode = _FailFirstOp(fake.capture_error)
            self._mode.__enter__()
            fake._active_modes.append(self._mode)
        self.capturing = True

    def capture_end(self):
        fake = self._fake
        fake.record("NPUGraph.capture_end")
        failed = False
        if self._mode is not None:
            failed = True
            self._mode.__exit__(None, None, None)
            if self._mode in fake._active_modes:
                fake._active_modes.remove(self._mode)
            self._mode = None
        if not self.capturing:
            raise RuntimeError("fake_npu: capture_end without capture_begin")
        self.capturing = False
        self.captured = not failed

    def replay(self):
        self._fake.record("NPUGraph.replay")
        if not self.captured:
            raise RuntimeError(_REPLAY_WITHOUT_CAPTURE)
        self.replays += 1

    def reset(self):
        self._fake.record("NPUGraph.reset")
        self.captured = False

    def pool(self):
        if not self.captured:
            raise RuntimeError(_POOL_WITHOUT_CAPTURE)
        return self._api.next_pool()

    def update(self, cpu_update_input):
        self._fake.record("NPUGraph.update", cpu_update_input)
        if not self.auto_dispatch_capture:
            raise RuntimeError("The current graph configuration does not support update,"
                               "Try to capture by setting auto_dispatch_capture=True during capture")


class _Graph:
    """Same signature and steps as torch_npu.npu.graphs.graph; __enter__ returns None."""

    _fake: FakeNpu
    _api: _NpuApi
    default_capture_stream = None

    def __init__(self, npu_graph, pool=None, stream=None, auto_dispatch_capture=False,
                 capture_error_mode: str = "global"):
        self._fake.record("graph", npu_graph, pool, stream, capture_error_mode)
        if self.__class__.default_capture_stream is None:
            self.__class__.default_capture_stream = self._api.new_stream(self._api.Stream, None, 0, None)
        self.pool = () if pool is None else (pool,)
        self.capture_stream = stream if stream is not None else self.__class__.default_capture_stream
        self.stream_ctx = self._api.StreamContext(self.capture_stream)
        self.npu_graph = npu_graph
        self.capture_error_mode = capture_error_mode
        self.npu_graph.auto_dispatch_capture = auto_dispatch_capture

    def __enter__(self):
        self._api.functions["synchronize"]()
        self._api.functions["empty_cache"]()
        self.stream_ctx.__enter__()
        self.npu_graph.capture_begin(*self.pool, capture_error_mode=self.capture_error_mode)

    def __exit__(self, exc_type, exc_value, traceback):
        self.npu_graph.capture_end()
        self.stream_ctx.__exit__(exc_type, exc_value, traceback)


class _NpuConfig:
    _fake: FakeNpu

    def __setattr__(self, name, value):
        if name == "allow_internal_format":
            self._fake.record("config.allow_internal_format", value)
            self._fake._set_option({"ALLOW_INTERNAL_FORMAT": "enable" if value else "disable"})
        # nothing is stored: reading raises AttributeError, as with the real one


class _AllowHF32Matmul:
    _fake: FakeNpu

    def __setattr__(self, name, value):
        if name == "allow_hf32":
            self._fake.record("matmul.allow_hf32", value)
            self._fake._set_option({"ALLOW_MATMUL_HF32": "enable" if value else "disable"})

    def __getattr__(self, name):
        if name == "allow_hf32":
            v = self._fake._get_option("ALLOW_MATMUL_HF32")
            return v is not None and v.decode() == "enable"
        return None


class _AllowHF32Conv:
    _fake: FakeNpu

    def __setattr__(self, name, value):
        if name == "allow_hf32":
            self._fake.record("conv.allow_hf32", value)
            self._fake._set_option({"ALLOW_CONV_HF32": "enable" if value else "disable"})

    def __getattr__(self, name):
        if name == "allow_hf32":
            v = self._fake._get_option("ALLOW_CONV_HF32")
            return v is None or v.decode() in ("", "enable")
        return None


class _NpuApi:
    """One FakeNpu's torch_npu classes (attributes), functions (``functions``, by name) and stream state."""

    def __init__(self, fake: FakeNpu) -> None:
        self.fake = fake
        self._counter = {"stream": 0, "pool": 0}
        self._default_streams: dict[int, Any] = {}
        self._current_streams: dict[int, Any] = {}
        bound = {"_fake": fake, "_api": self}
        self.device = _bind(_Device, "device", _fake=fake)
        self.Event = _bind(_Event, "Event", **bound)
        self.Stream = _bind(_Stream, "Stream", **bound)
        self.StreamContext = _bind(_StreamContext, "StreamContext", **bound)
        self.NPUGraph = _bind(_NPUGraph, "NPUGraph", **bound)
        self.graph = _bind(_Graph, "graph", default_capture_stream=None, **bound)
        classes = {cls.__name__: cls for cls in (self.device, self.Event, self.Stream, self.StreamContext,
                                                 self.NPUGraph, self.graph)}
        # plain functions, as torch_npu's are (same names, signatures and arity errors)
        self.functions: dict[str, Any] = {**classes, **_device_functions(fake), **_info_functions(fake),
                                          **_memory_functions(fake), **_stream_functions(self),
                                          **_option_functions(fake)}

    # ---- modules

    def build_npu_module(self) -> types.ModuleType:
        """torch_npu.npu, with torch_npu.npu.utils as its ``utils``."""
        utils = types.ModuleType("torch_npu.npu.utils")
        npu = types.ModuleType("torch_npu.npu")
        for mod in (utils, npu):
            for name in _UTILS_NAMES:
                setattr(mod, name, self.functions[name])
        for name in _NPU_ONLY_NAMES:
            setattr(npu, name, self.functions[name])
        npu.utils = utils
        npu.config = _bind(_NpuConfig, "_npuConfig", _fake=self.fake)()
        npu.matmul = _bind(_AllowHF32Matmul, "_allowHF32Matmul", _fake=self.fake)()
        npu.conv = _bind(_AllowHF32Conv, "_allowHF32Conv", _fake=self.fake)()
        return npu

    def build_torch_npu_module(self, npu: types.ModuleType) -> types.ModuleType:
        """torch_npu, with ``npu``, ``_C`` and ``utils``."""
        C = types.ModuleType("torch_npu._C")
        for name in ("_npu_getOption", "_npu_setOption", "_get_cann_version"):
            setattr(C, name, self.functions[name])

        top_utils = types.ModuleType("torch_npu.utils")
        top_utils.get_cann_version = self.functions["get_cann_version"]

        tnpu = types.ModuleType("torch_npu")
        tnpu.__version__ = self.fake.version
        tnpu.npu = npu
        tnpu._C = C
        tnpu.utils = top_utils
        return tnpu

    # ---- streams and pools: the state the classes and functions share

    def new_stream(self, cls, device, priority, stream_id):
        """A ``cls`` (the bound Stream) without recording a call; a fresh id unless ``stream_id``."""
        stream = object.__new__(cls)
        idx = self.fake._index(device)
        stream.device_index = self.fake._check(self.fake.current if idx < 0 else idx)
        stream.priority = priority
        if stream_id is None:
            self._counter["stream"] += 1
            stream_id = self._counter["stream"]
        stream.stream_id = stream_id
        return stream

    def default_stream_of(self, idx):
        if idx not in self._default_streams:
            self._default_streams[idx] = self.new_stream(self.Stream, idx, 0, 0)
        return self._default_streams[idx]

    def current_stream_of(self, idx):
        return self._current_streams.get(idx) or self.default_stream_of(idx)

    def make_current(self, s):
        # like _npu_setStream: makes the stream's device current too
        self._current_streams[s.device_index] = s
        self.fake.current = s.device_index

    def next_pool(self):
        self._counter["pool"] += 1
        return (self._counter["pool"], 0)


# The factories below make one FakeNpu's torch_npu functions as closures over it; each returns {name: function}.

def _device_functions(fake: FakeNpu) -> dict[str, Any]:
    def is_available():
        fake.record("is_available")
        return fake.device_count > 0

    def device_count():
        fake.record("device_count")
        return fake.device_count

    def set_device(device):
        fake.record("set_device", device)
        idx = fake._index(device)
        if idx >= 0:
            fake.current = fake._check(idx)

    def current_device():
        fake.record("current_device")
        return fake.current

    def synchronize(device=None):
        fake.record("synchronize", device)
        if device is not None:
            fake._check(fake._index(device))

    def is_bf16_supported():  # no arguments, unlike torch.cuda's
        fake.record("is_bf16_supported")
        return fake.bf16

    return {f.__name__: f for f in (is_available, device_count, set_device, current_device, synchronize,
                                    is_bf16_supported)}


def _info_functions(fake: FakeNpu) -> dict[str, Any]:
    def get_device_name(device_name=None):
        fake.record("get_device_name", device_name)
        idx = fake._index(device_name)
        if idx < 0 or idx >= fake.device_count:
            raise AssertionError("Invalid device id" + _PTA_VALUE)
        return fake.soc_name

    def get_device_properties(device_name=None):
        fake.record("get_device_properties", device_name)
        idx = fake._index(device_name)
        if idx < 0 or idx >= fake.device_count:
            raise AssertionError("Invalid device id" + _PTA_VALUE)
        return types.SimpleNamespace(name=fake.soc_name, total_memory=64 * 2**30)

    def get_cann_version(module="CANN"):
        fake.record("get_cann_version", module)
        if not isinstance(module, str):
            raise RuntimeError("invalid value of module, module must be string")
        return fake.cann_version if module in _CANN_MODULES else ""

    def _get_cann_version(module):
        return get_cann_version(module)

    return {f.__name__: f for f in (get_device_name, get_device_properties, get_cann_version, _get_cann_version)}


def _memory_functions(fake: FakeNpu) -> dict[str, Any]:
    def memory_allocated(device=None):
        fake.record("memory_allocated", device)
        return fake.allocated_bytes

    def max_memory_allocated(device=None):
        fake.record("max_memory_allocated", device)
        return fake.peak_bytes

    def reset_peak_memory_stats(device=None):
        fake.record("reset_peak_memory_stats", device)
        fake.peak_bytes = fake.allocated_bytes

    def empty_cache():
        fake.record("empty_cache")

    return {f.__name__: f for f in (memory_allocated, max_memory_allocated, reset_peak_memory_stats, empty_cache)}


def _stream_functions(api: _NpuApi) -> dict[str, Any]:
    fake = api.fake

    def default_stream(device=None):
        fake.record("default_stream", device)
        return api.default_stream_of(fake._check(fake._index(device)))

    def current_stream(device=None):
        fake.record("current_stream", device)
        return api.current_stream_of(fake._check(fake._index(device)))

    def set_stream(stream):
        fake.record("set_stream", stream)
        if stream is not None:
            api.make_current(stream)

    def stream(stream):
        return api.StreamContext(stream)

    def is_current_stream_capturing():
        return any(g.capturing for g in fake.graphs)

    def graph_pool_handle():
        return api.next_pool()

    return {f.__name__: f for f in (default_stream, current_stream, set_stream, stream, is_current_stream_capturing,
                                    graph_pool_handle)}


def _option_functions(fake: FakeNpu) -> dict[str, Any]:
    def _npu_getOption(name):
        fake.record("_C._npu_getOption", name)
        return fake._get_option(name)

    def _npu_setOption(option):
        fake.record("_C._npu_setOption", dict(option))
        fake._set_option(option)

    def set_option(option):
        fake.record("set_option", dict(option) if isinstance(option, dict) else option)
        if not isinstance(option, dict):
            raise TypeError("npu option must be a dict." + _PTA_VALUE)
        for name, value in option.items():
            allowed = _OPTION_VALUES.get(name)
            if allowed is not None and str(value) not in allowed:
                raise ValueError(f"value of {name} should be in {allowed} but got {value}" + _PTA_VALUE)
        fake._set_option(option)

    def _lazy_init():
        pass

    def is_initialized():
        return True

    return {f.__name__: f for f in (_npu_getOption, _npu_setOption, set_option, _lazy_init, is_initialized)}
