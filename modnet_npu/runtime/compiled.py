"""Compilation for fixed input shapes: AOTInductor packages cached on disk (CPU, CUDA), torchair on an NPU.

A compiled model compiles (or loads) a shape when asked to :meth:`prepare` it,
at warm-up; until it is sealed, a shape seen for the first time is prepared
then (a one-off command). After :meth:`seal` a shape outside the prepared set
runs eagerly, logged once, and is never compiled inside a request.

Packages are keyed by the weights and the model's code, the device's architecture (a CUDA GPU's
compute capability and name, an NPU's SoC, a CPU's instruction set), the shape,
the dtype and the torch version. A package that cannot be loaded or run (cut
short, foreign, from another torch) is compiled again, said in one line.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from modnet_npu.fileio import atomic_path
from modnet_npu.runtime.options import compile_cache_dir
from modnet_npu.runtime import devices
from modnet_npu.runtime.graphs import FastPathError, Log, _quiet, shape_text
from modnet_npu.source.resolve import DEFAULT_MODELS_DIR

DEFAULT_COMPILE_CACHE = compile_cache_dir(DEFAULT_MODELS_DIR)


def model_digest(model: nn.Module) -> str:
    """A short hash of what a compiled form computes: the model's tensors and their names, and the source
    files of its module classes (for this project's classes, every file of their package: the helpers and
    constants a forward uses live beside it) and of this module (the compilation's settings).

    The code is part of the key because the same weights in a changed forward (an upgrade of this
    project, an edited model) are another program: a package compiled from the old code would still
    load and silently compute the old function."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d: flat first
    classes = {type(m) for m in model.modules()}
    for name in sorted(f"{c.__module__}.{c.__qualname__}" for c in classes):
        h.update(name.encode())
    sources = {_source_file(c) for c in classes}
    sources |= {str(p) for f in sources if f and _ours(f) for p in Path(f).parent.glob("*.py")} | {__file__}
    for digest in sorted({_file_digest(f) for f in sources}):
        h.update(digest)  # the files' contents, not their paths: a cache moved with its models stays valid
    return h.hexdigest()[:16]


_PACKAGE = Path(__file__).resolve().parents[1]  # modnet_npu/


def _ours(path: str) -> bool:
    return Path(path).resolve().is_relative_to(_PACKAGE)


def _source_file(cls: type) -> str:
    try:
        return inspect.getfile(cls)
    except (TypeError, OSError):  # a class without a file (built in, made at run time): its name says it
        return ""


@functools.lru_cache(maxsize=64)
def _file_digest(path: str) -> bytes:
    if not path:
        return b""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).digest()
    except OSError:
        return b""


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use (the first of its ``cpp.cxx`` list found on PATH), or None."""
    from torch._inductor import config

    cxx = config.cpp.cxx
    for name in cxx if isinstance(cxx, (list, tuple)) else (cxx,):
        if name and shutil.which(name):  # None stands for a conda-installed g++, off by default
            return name
    return None


def cuda_toolkit() -> str | None:
    """The CUDA toolkit AOTInductor builds against on CUDA, or None where it is missing.

    ``torch.utils.cpp_extension`` looks for it in ``CUDA_HOME`` (or ``CUDA_PATH``),
    then beside ``nvcc`` on PATH, then in /usr/local/cuda, and fails with
    "CUDA_HOME environment variable is not set" at the first CUDA path it needs;
    the package's C++ wrapper includes the CUDA runtime's headers from there.
    """
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME  # found once, at its import: what inductor will use
    if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
        return home
    return None


def architecture(device: Any) -> str:
    """What compiled code depends on besides the weights: a name safe in a file name."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device.index)
        text = f"sm{p.major}{p.minor}-{p.name}"
    elif device.type == "npu":
        text = devices.device_name(device)  # the SoC: Ascend910B4, Ascend310P3 ...
    else:
        import platform

        try:  # inductor's CPU kernels use the vector instructions of the machine that compiled them
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            isa = str(pick_vec_isa()) or "novec"
        except Exception:  # an inductor without the module: the machine alone
            isa = "unknown"
        text = f"{platform.machine()}-{isa}"
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


class AotCompiled:
    """``model`` compiled ahead of time by AOTInductor, one package per input shape.

    Packages (``.pt2``) are written to ``cache_dir`` under a name made of the
    model's hash (weights and code: :func:`model_digest`), the device, the shape, the dtype, the torch version and the
    device's architecture, so a later run on the same kind of device loads the
    compiled kernels in a second or two instead of compiling again (a minute or
    more on two CPU cores), and a cache copied to another GPU is not loaded there.
    Inductor's freezing makes the weights constants, folded and pre-packed for the
    device's kernels.
    """

    def __init__(self, model: nn.Module, device: Any, cache_dir: str, log: Log = _quiet) -> None:
        self.model, self.device, self.cache_dir, self.log = model, device, cache_dir, log
        self.digest = model_digest(model)
        self.arch = architecture(device)
        self.loaded: dict[tuple, Callable] = {}
        self.compiled_now = 0
        self.from_cache = 0
        self.stale = 0  # packages found but refused (cut short, foreign): compiled again
        self.sealed = False
        self.outside: set[tuple] = set()
        self._lock = threading.Lock()

    def package_path(self, x: torch.Tensor) -> str:
        shape = "x".join(str(d) for d in x.shape)
        dtype = str(x.dtype).removeprefix("torch.")
        version = torch.__version__.replace("+", "_")
        return os.path.join(self.cache_dir, f"modnet-{self.digest}-{self.device.type}-{shape}-{dtype}-"
                                            f"torch{version}-{self.arch}.pt2")

    def _compile(self, x: torch.Tensor, path: str) -> None:
        self.log(f"compiling for input {tuple(x.shape)} (once; cached in {self.cache_dir})")
        try:
            with torch.inference_mode():
                program = torch.export.export(self.model, (x,))
            with atomic_path(path) as tmp:
                torch._inductor.aoti_compile_and_package(program, package_path=tmp,
                                                         inductor_configs={"freezing": True})
        except Exception as exc:  # inductor's errors carry the whole build log
            with torch.inference_mode():
                self.model(x)  # an input the model itself refuses is the input's error, not the compiler's
            raise FastPathError(f"--compile: compiling for input {tuple(x.shape)} failed ({devices.one_line(exc)}); "
                                "run without --compile") from exc
        self.compiled_now += 1

    def _load(self, path: str, x: torch.Tensor) -> Callable:
        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
        fn = torch._inductor.aoti_load_package(path, device_index=index)
        with torch.inference_mode():
            fn(x)  # a foreign package may load and fail at its first call: find out now
        return fn

    def _load_cached(self, key: tuple, path: str, x: torch.Tensor) -> Callable | None:
        """The cached package at ``path``, or None (said in one line) when it cannot be loaded or run."""
        try:
            fn = self._load(path, x)
        except Exception as exc:
            self.stale += 1
            self.log(f"compile cache: {os.path.basename(path)} cannot be used ({devices.one_line(exc)}); "
                     f"compiling {shape_text(key)} again")
            return None
        self.from_cache += 1
        return fn

    def prepare(self, x: torch.Tensor) -> Callable:
        """The compiled forward for ``x``'s shape: loaded from the cache, else compiled now; run once."""
        key = (tuple(x.shape), x.dtype)
        with self._lock:
            fn = self.loaded.get(key)
            if fn is None:
                path = self.package_path(x)
                fn = self._load_cached(key, path, x) if os.path.exists(path) else None
                if fn is None:
                    self._compile(x, path)
                    try:
                        fn = self._load(path, x)
                    except Exception as exc:
                        raise FastPathError(f"--compile: the package compiled for input {tuple(x.shape)} cannot "
                                            f"run ({devices.one_line(exc)}); run without --compile") from exc
                self.loaded[key] = fn
        return fn

    def seal(self) -> None:
        self.sealed = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        fn = self.loaded.get(key)
        if fn is None and self.sealed:
            if key not in self.outside:
                self.outside.add(key)
                self.log(f"input {shape_text(key)} is outside the compiled shape set: it runs eagerly")
            return self.model(x)
        return (fn or self.prepare(x))(x)

    def prepared_batches(self, tail: tuple, dtype: torch.dtype) -> set[int]:
        return {k[0][0] for k in self.loaded if k[0][1:] == tail and k[1] == dtype}


class TorchairCompiled:
    """``torch.compile`` with torchair's NPU backend; each shape is compiled when prepared (or first seen)."""

    from_cache = 0  # torchair keeps no compiled forms between runs here
    stale = 0

    def __init__(self, model: nn.Module, backend: Callable, log: Log = _quiet) -> None:
        self.model, self.log = model, log
        self.fn = torch.compile(model, backend=backend, dynamic=False)
        self.shapes: set[tuple] = set()
        self.sealed = False
        self.outside: set[tuple] = set()

    @property
    def compiled_now(self) -> int:
        return len(self.shapes)

    def prepare(self, x: torch.Tensor) -> Callable:
        key = (tuple(x.shape), x.dtype)
        if key not in self.shapes:
            try:
                self.fn(x)
            except Exception as exc:  # dynamo and GE errors run to pages
                inner = getattr(exc, "inner_exception", None) or exc  # dynamo's BackendCompilerFailed wraps the cause
                raise FastPathError(f"--compile: torchair compilation for input {tuple(x.shape)} failed "
                                    f"({devices.one_line(inner)}); run without --compile") from exc
            self.shapes.add(key)
        return self.fn

    def seal(self) -> None:
        self.sealed = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key in self.shapes:
            return self.fn(x)
        if self.sealed:
            if key not in self.outside:
                self.outside.add(key)
                self.log(f"input {shape_text(key)} is outside the compiled shape set: it runs eagerly")
            return self.model(x)
        return self.prepare(x)(x)

    def prepared_batches(self, tail: tuple, dtype: torch.dtype) -> set[int]:
        return {k[0][0] for k in self.shapes if k[0][1:] == tail and k[1] == dtype}


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


def check_toolchain(device: Any) -> None:
    """FastPathError, before anything is built, when ``--compile`` cannot work on ``device`` here."""
    if device.type not in ("cpu", "cuda"):
        raise FastPathError(f"--compile is not supported on {device.type}; run without it")
    if cpp_compiler() is None:
        where = "the CPU" if device.type == "cpu" else "CUDA (AOTInductor's wrapper)"
        raise FastPathError(f"--compile on {where} needs a C++ compiler (g++); install it (apt-get install g++) "
                            "or run without --compile")
    if device.type == "cuda" and cuda_toolkit() is None:
        raise FastPathError("--compile on CUDA needs the CUDA toolkit (AOTInductor builds against its headers), "
                            "found neither CUDA_HOME (or CUDA_PATH), nor nvcc on PATH, nor /usr/local/cuda with "
                            "include/cuda_runtime_api.h; install the toolkit matching torch.version.cuda and set "
                            "CUDA_HOME, or run without --compile")


def compile_model(model: nn.Module, device: Any, cache_dir: str = DEFAULT_COMPILE_CACHE,
                  log: Log = _quiet) -> AotCompiled | TorchairCompiled:
    """Compile for inference: AOTInductor packages on CPU/CUDA (cached), torchair on NPU."""
    if device.type == "npu":
        return TorchairCompiled(model, torchair_backend(), log)
    check_toolchain(device)
    os.makedirs(cache_dir, exist_ok=True)
    return AotCompiled(model, device, cache_dir, log)
