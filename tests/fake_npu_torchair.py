"""A fake torchair: working (a backend that runs the traced graph eagerly), or failing the way
torch_npu's lazy module does (see tests/fake_npu.py)."""
from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from fake_npu_messages import _PTA_INTERNAL, TORCHAIR_IMPORT_ERROR_TEXT
from fake_npu_modules import _bind

if TYPE_CHECKING:
    from fake_npu import FakeNpu


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
