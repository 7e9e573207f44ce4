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

import sys
from typing import Any, Optional

import torch

# the parts live in fake_npu_messages, fake_npu_modules and fake_npu_torchair; tests import from here
from fake_npu_messages import (  # noqa: F401 (re-exported)
    _PTA_VALUE,
    ACL_OP_DISABLED_ERROR,
    ACLOP_CAPTURE_ERROR,
    MODULE_NAMES,
    TASK_QUEUE_CAPTURE_ERROR,
    TORCHAIR_IMPORT_ERROR_TEXT,
)
from fake_npu_modules import FakeDevice, _FailFirstOp, _NpuApi, fake_device  # noqa: F401 (re-exported)
from fake_npu_torchair import _LazyTorchair, _TorchairImportError, _torchair_module  # noqa: F401 (re-exported)


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
