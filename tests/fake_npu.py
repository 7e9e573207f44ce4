"""A fake ``torch_npu`` and ``torch.npu`` for tests on machines without an Ascend NPU.

Usage::

    from fake_npu import FakeNpu, ACLOP_CAPTURE_ERROR

    with FakeNpu(device_count=2, bf16=True, capture_error=None, torchair_error=None) as npu:
        import torch_npu                   # the fake module
        torch.npu.set_device(1)            # torch.npu is the fake torch.npu module
        ...
        assert ("set_device", (1,)) in npu.calls
        assert npu.current == 1
        assert npu.options["ALLOW_INTERNAL_FORMAT"] == "disable"

While the ``with`` block runs, ``sys.modules`` holds the fake under ``torch_npu``,
``torch_npu.npu``, ``torch_npu.npu.utils``, ``torch_npu._C``, ``torch_npu.utils``,
``torch.npu`` and ``torchair``, and ``torch.npu`` is set. On exit every one of
these is put back as it was (removed, or the previous object restored).

What this fake can and cannot test
----------------------------------
CPU builds of torch have no ``npu`` device: tensors cannot live on it, and
``torch.device("npu")`` itself raises (the real torch_npu renames torch's
``privateuse1`` backend to ``npu`` at import). Do not call
``torch.utils.rename_privateuse1_backend("npu")`` in tests to get round that:
it cannot be undone, and afterwards ``torch.compile`` fails for the rest of the
process (torch.accelerator then looks for a ``torch.npu`` module). So code under
test is checked at the level of *calls*: which device was made current, which
options were set, what ``synchronize`` got, whether a graph was captured and
replayed, which torchair config was asked for. Tensors stay on the CPU; where
code needs a device object, :func:`fake_device` gives a stand-in with
``.type == "npu"`` and ``.index`` that the fake's functions accept.

Graph capture: ``torch.npu.graph(g)`` behaves like the real context manager
(synchronize, empty_cache, switch to a side stream, ``g.capture_begin``; on exit
``g.capture_end`` and restore the stream); ``replay`` is a recorded no-op. When
``capture_error`` is set, capture fails with ``RuntimeError(capture_error)``:
by default (``capture_error_at="body"``) at the first torch operation run while
capturing, as the real aclop check does; with ``capture_error_at="begin"`` from
``capture_begin`` itself, as the real TASK_QUEUE_ENABLE=2 check does. With
``TASK_QUEUE_ENABLE=2`` in the environment ``capture_begin`` raises the real
message too.

torchair: with ``torchair_error`` unset, ``import torchair`` gives a fake with
``CompilerConfig`` and ``get_npu_backend(*, compiler_config=None,
custom_decompositions={})``, whose backend runs the traced graph eagerly, so
``torch.compile(model, backend=backend)`` works on CPU tensors. With
``torchair_error`` set, ``sys.modules["torchair"]`` is a lazy object like the
one torch_npu installs: ``import torchair`` succeeds, and attribute access (or
``from torchair import X``) raises :class:`_TorchairImportError`, a subclass of
``Exception`` (not ``ImportError``), chained from the original error.

Facts behind the fake (file:line of the torch_npu 2.9.0 wheel) are in the
project's notes; the messages below are the real ones.
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Suffix torch_npu appends to its errors (PTA_ERROR(ErrCode::NOT_SUPPORT)); time, PID and device vary.
_PTA_NOT_SUPPORT = "\n[ERROR] 2025-01-01-00:00:00 (PID:1, Device:0, RankID:-1) ERR00007 PTA feature not supported"
_PTA_INTERNAL = "\n[ERROR] 2025-01-01-00:00:00 (PID:1, Device:-1, RankID:-1) ERR00005 PTA internal error"
_PTA_VALUE = "\n[ERROR] 2025-01-01-00:00:00 (PID:1, Device:0, RankID:-1) ERR00003 PTA invalid value"

#: What torch_npu raises when an aclop (legacy) operator runs during NPU graph capture
#: (NPUGraphsUtils.h assertNotCapturingAclop), here for a Conv2D.
ACLOP_CAPTURE_ERROR = (
    "Cannot run aclop operators during NPU graph capture. Current working aclop is Conv2D. "
    "If you need this call to be captured, please try to set torch.npu.config.allow_internal_format = False. "
    "If still fail, the operator needs aclnn implementation and please file an issue. "
    "Current npuStreamCaptureStatus: npuStreamCaptureStatusActive" + _PTA_NOT_SUPPORT
)

#: What NPUGraph::capture_begin raises when TASK_QUEUE_ENABLE=2.
TASK_QUEUE_CAPTURE_ERROR = (
    "Do not support TASK_QUEUE_ENABLE = 2 during NPU graph capture, please export TASK_QUEUE_ENABLE=1/0."
    + _PTA_NOT_SUPPORT
)

#: What any aclop operator raises when ACL_OP_INIT_MODE=2 (LazyInitAclops); not raised by the fake.
ACL_OP_DISABLED_ERROR = "Acl op is disabled! Please check the environment variable ACL_OP_INIT_MODE." + _PTA_NOT_SUPPORT

#: str() of the real _TorchairImportError (torch_npu 2.9.0 wording; 2.9.0.post2 fixes the spelling).
TORCHAIR_IMPORT_ERROR_TEXT = (
    "\nAn error occured when import `torchair` and the above is the specific error message. \n"
    "This error message was generated when import torchair, but throwed asynchronously here. \n"
    "Please check the error message above. \n" + _PTA_INTERNAL
)

_REPLAY_WITHOUT_CAPTURE = "Called NPUGraph::replay without a preceding successful capture."
_POOL_WITHOUT_CAPTURE = "Called NPUGraph::pool() without a preceding successful capture."
_ALREADY_CAPTURED = ("This NPUGraph instance already owns a captured graph. "
                     "To capture a new graph, create a new instance.")
_DEFAULT_STREAM_CAPTURE = ("NPU graphs must be captured on a non-default stream. "
                           "(However, after capture, it's ok to replay them on the default stream.)")

# set_option's checked values (npu_config.py _option_map)
_OPTION_VALUES = {
    "ACL_PRECISION_MODE": ["allow_fp32_to_fp16", "must_keep_origin_dtype"],
    "ACL_OP_SELECT_IMPL_MODE": ["high_performance", "high_precision"],
    "ACL_OP_DEBUG_LEVEL": ["0", "1", "2", "3", "4"],
    "ACL_OP_COMPILER_CACHE_MODE": ["disable", "enable", "force"],
}
_CANN_MODULES = ("CANN", "RUNTIME", "COMPILER", "HCCL", "TOOLKIT", "OPP", "OPP_KERNEL", "DRIVER")

# what a FakeNpu puts into sys.modules while active
MODULE_NAMES = ("torch_npu", "torch_npu.npu", "torch_npu.npu.utils", "torch_npu._C", "torch_npu.utils",
                "torch.npu", "torchair")


@dataclass(frozen=True)
class FakeDevice:
    """Stand-in for ``torch.device("npu", index)``, which CPU torch cannot build."""

    index: Optional[int] = 0
    type: str = "npu"

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


def fake_device(index: Optional[int] = 0) -> FakeDevice:
    return FakeDevice(index)


class _TorchairImportError(Exception):
    """Mimics torch_npu.dynamo._TorchairImportError (2.9.0; ``_ImportError`` in 2.9.0.post2): base Exception."""

    def __init__(self) -> None:
        super().__init__(self)
        self.err_info = TORCHAIR_IMPORT_ERROR_TEXT

    def __str__(self) -> str:
        return self.err_info


class _LazyTorchair:
    """Like torch_npu's lazy ``sys.modules['torchair']`` when the real torchair fails to import."""

    def __init__(self, error: BaseException) -> None:
        self._error = error
        self._failed = False
        self._allowed_list = ["__spec__", "__path__"]

    def __getattr__(self, name: str) -> Any:
        if self._failed:
            raise _TorchairImportError() from self._error
        if name not in self._allowed_list:
            raise AttributeError(f"Try to get torchair's attr `{name}` before torchair is initialized." + _PTA_INTERNAL)
        # first touch (the import statement reads __spec__): the original error, swallowed by the
        # import machinery; every later access raises _TorchairImportError
        self._failed = True
        raise self._error


class _FailFirstOp(TorchDispatchMode):
    """Raises ``RuntimeError(message)`` at the first torch op: an aclop met during capture."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise RuntimeError(self.message)


class FakeNpu:
    """Installs a fake torch_npu / torch.npu / torchair for the duration of a ``with`` block.

    Parameters: ``device_count`` NPUs; ``bf16`` is what ``is_bf16_supported()`` says;
    ``capture_error`` (message) makes graph capture fail, at ``capture_error_at``
    ("body": first torch op while capturing; "begin": in capture_begin);
    ``torchair_error`` (exception, or message for a ModuleNotFoundError) makes torchair
    fail to load the way the real lazy module does; ``soc_name`` is the device name;
    ``cann_version`` what ``get_cann_version()`` returns; ``version`` is
    ``torch_npu.__version__``; ``options`` pre-sets torch_npu options (str -> str), e.g.
    ``{"ALLOW_INTERNAL_FORMAT": "disable"}`` as an A3 part sets it at initialisation.

    State tests read or set: ``calls`` [(name, args)], ``options`` {name: value},
    ``current`` (current device index), ``allocated_bytes`` / ``peak_bytes``
    (what the memory functions report), ``capture_error``, ``graphs`` (every NPUGraph made),
    ``torch_npu`` / ``npu`` / ``torchair`` (the installed fakes).
    """

    def __init__(self, device_count: int = 1, bf16: bool = True, capture_error: Optional[str] = None,
                 torchair_error: Any = None, *, capture_error_at: str = "body", soc_name: str = "Ascend910B4",
                 cann_version: str = "8.3.RC1", version: str = "2.9.0.post1",
                 options: Optional[dict[str, str]] = None) -> None:
        if capture_error_at not in ("body", "begin"):
            raise ValueError("capture_error_at must be 'body' or 'begin'")
        self.device_count = device_count
        self.bf16 = bf16
        self.capture_error = capture_error
        self.capture_error_at = capture_error_at
        self.torchair_error = torchair_error
        self.soc_name = soc_name
        self.cann_version = cann_version
        self.version = version
        self.options: dict[str, str] = dict(options or {})
        self.calls: list[tuple[str, tuple]] = []
        self.current = 0
        self.allocated_bytes = 0
        self.peak_bytes = 0
        self.graphs: list[Any] = []
        self._saved: Optional[dict[str, Any]] = None
        self._active_modes: list[_FailFirstOp] = []
        self._build()

    # ------------------------------------------------------------------ records

    def record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        """The names of the recorded calls, in order."""
        return [name for name, _ in self.calls]

    def called(self, name: str) -> list[tuple]:
        """The argument tuples of every recorded call named ``name``."""
        return [args for n, args in self.calls if n == name]

    # ------------------------------------------------------------------ install

    def __enter__(self) -> "FakeNpu":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def install(self) -> None:
        if self._saved is not None:
            raise RuntimeError("this FakeNpu is already installed")
        missing = object()
        self._saved = {
            "modules": {k: sys.modules.get(k, missing) for k in MODULE_NAMES},
            "torch.npu": getattr(torch, "npu", missing) if "npu" in vars(torch) else missing,
            "missing": missing,
        }
        sys.modules.update({
            "torch_npu": self.torch_npu,
            "torch_npu.npu": self.npu,
            "torch_npu.npu.utils": self.npu.utils,
            "torch_npu._C": self.torch_npu._C,
            "torch_npu.utils": self.torch_npu.utils,
            "torch.npu": self.npu,
            "torchair": self.torchair,
        })
        torch.npu = self.npu  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        if self._saved is None:
            return
        while self._active_modes:  # a capture_begin never ended
            self._active_modes.pop().__exit__(None, None, None)
        missing = self._saved["missing"]
        for key, old in self._saved["modules"].items():
            if old is missing:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = old
        if self._saved["torch.npu"] is missing:
            if "npu" in vars(torch):
                delattr(torch, "npu")
        else:
            torch.npu = self._saved["torch.npu"]  # type: ignore[attr-defined]
        self._saved = None

    # ------------------------------------------------------------------ helpers

    def _index(self, device: Any, optional: bool = True) -> int:
        """torch_npu's _get_device_index for what CPU torch can express."""
        if device is None:
            if optional:
                return self.current
            raise ValueError("Expected a npu device, but got: None")
        if isinstance(device, bool):
            raise TypeError(f"invalid device {device!r}")
        if isinstance(device, int):
            return device
        if isinstance(device, self._device_cls):
            return device.idx
        if isinstance(device, str):
            kind, _, idx = device.partition(":")
            if kind != "npu":
                raise ValueError(f"Expected a npu device, but got: {device}" + _PTA_VALUE)
            return int(idx) if idx else self.current
        kind = getattr(device, "type", None)
        if kind is not None:
            if kind != "npu":
                raise ValueError(f"Expected a npu device, but got: {device}" + _PTA_VALUE)
            index = getattr(device, "index", None)
            return self.current if index is None else int(index)
        raise ValueError(f"Expected a npu device, but got: {device!r}" + _PTA_VALUE)

    def _check(self, idx: int) -> int:
        if not 0 <= idx < self.device_count:
            # the real error comes from ACL (aclrtSetDevice) and reads differently
            raise RuntimeError(f"fake_npu: invalid device id {idx} ({self.device_count} NPUs)")
        return idx

    def _set_option(self, option: dict) -> None:
        for key, value in option.items():
            self.options[str(key)] = str(value)

    def _get_option(self, name: Any) -> Optional[bytes]:
        if not isinstance(name, str):
            raise RuntimeError("invalid argument to option_type,option_type must string!")
        value = self.options.get(name)
        return None if value is None else value.encode()

    # ------------------------------------------------------------------ build

    def _build(self) -> None:
        api = _NpuApi(self)
        self._device_cls = api.device
        self.npu = api.build_npu_module()
        self.torch_npu = api.build_torch_npu_module(self.npu)
        self.torchair = self._build_torchair()

    def _build_torchair(self) -> Any:
        if self.torchair_error is not None:
            err = self.torchair_error
            if not isinstance(err, BaseException):
                err = ModuleNotFoundError(str(err))
            return _LazyTorchair(err)
        return _torchair_module(self)


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


# ---------------------------------------------------------------------------- torchair

class _OptionValue:
    def __init__(self, default, optional=None):
        self.optional = optional
        self._value = default

    @property
    def value(self):
        return None if self._value is None else str(self._value)

    @value.setter
    def value(self, v):
        if self.optional is not None and v not in self.optional:
            raise ValueError(f"Value {v!r} (type: {type(v)}) not in optional list {self.optional}")
        self._value = v


class _CompilerConfig:
    """Fields as torchair's; ``mode`` is an option object (read ``.value``), unknown names raise."""

    _fake: FakeNpu

    def __init__(self):
        object.__setattr__(self, "mode", _OptionValue("max-autotune", ["max-autotune", "reduce-overhead"]))
        for name in ("debug", "aoe_config", "export", "dump_config", "fusion_config",
                     "experimental_config", "inference_config", "ge_config", "npugraphex_config"):
            object.__setattr__(self, name, types.SimpleNamespace())
        object.__setattr__(self, "aclgraph_config", types.SimpleNamespace(use_custom_pool=None))
        self._fake.record("torchair.CompilerConfig")

    def __setattr__(self, name, value):
        if name not in vars(self):
            raise ValueError(f"CompilerConfig has no option {name}, all options {sorted(vars(self))}")
        current = vars(self)[name]
        if isinstance(current, _OptionValue):
            current.value = value
        else:
            object.__setattr__(self, name, value)


def _torchair_module(fake: FakeNpu) -> types.ModuleType:
    """One FakeNpu's working torchair: ``CompilerConfig``, ``get_npu_backend``, ``get_compiler``."""
    CompilerConfig = _bind(_CompilerConfig, "CompilerConfig", _fake=fake)

    def get_npu_backend(*, compiler_config=None, custom_decompositions={}):  # noqa: B006 (as torchair)
        fake.record("torchair.get_npu_backend", compiler_config)
        config = compiler_config if compiler_config is not None else CompilerConfig()

        def npu_backend(gm, example_inputs):
            fake.record("torchair.backend", config, len(example_inputs))
            return gm.forward

        return npu_backend

    def get_compiler(compiler_config=None):
        fake.record("torchair.get_compiler", compiler_config)
        return get_npu_backend(compiler_config=compiler_config)

    mod = types.ModuleType("torchair")
    mod.CompilerConfig = CompilerConfig
    mod.get_npu_backend = get_npu_backend
    mod.get_compiler = get_compiler
    mod.__all__ = ["CompilerConfig", "get_npu_backend", "get_compiler"]
    return mod
