"""Engine options: what opens a MODNet for matting, with one owner for every tool. Torch-free.

:class:`EngineOptions` is the one type that says which model, engine, device,
precision, model input size and fast path a run uses. ``inference.py`` (locally
and on Ray), ``serve.py``, ``benchmark.py`` and the pipeline parse it with the one
argparse group :func:`add_engine_arguments` and :func:`engine_options_from`;
``matting.Matter`` opens it; Ray actors receive it whole. Building one checks
every value (:class:`errors.UsageError`, exit status 2 in every tool), so a bad
option ends a run before any model is read, downloaded or started.

The module also owns the two decisions every path shares: the device string
(:func:`parse_device`) and which backend runs (:func:`choose_engine`, asked with
whatever finds accelerators: this machine's devices, or a Ray cluster's resources).

Nothing here imports torch: an entry point parses its options before torch loads
(OpenMP reads its settings once, when torch brings it in).
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from modnet_npu.errors import UsageError
from modnet_npu.matting.imaging import ShortSide, SizeSpec, parse_size_spec
from modnet_npu.model.contract import MAX_MODEL_SIDE, SIZE_MULTIPLE
from modnet_npu.model.precision import PRECISIONS
from modnet_npu.source.resolve import DEFAULT_MODEL_ID, DEFAULT_MODELS_DIR

BACKENDS = ("torch", "ort", "openvino")  # openvino: optional (requirements-bench.txt), CPU only
BACKEND_CHOICES = ("auto", *BACKENDS)
DEVICE_KINDS = ("auto", "cpu", "mps", "npu", "cuda")
INDEXED_KINDS = ("npu", "cuda")  # the kinds with several devices per machine
DEVICE_CHOICES = "auto|npu|npu:N|cuda|cuda:N|mps|cpu"
GRAPHS_CHOICES = ("auto", "on", "off")
MODEL_FORMS = ("optimized", "faithful")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|npu|cuda)(?::(\d+))?$")

# The one meaning of threads=0, for every tool and the library (process_setup.effective_threads).
THREADS_HELP = ("CPU threads (0 = automatic: the CPUs other processes leave free at the start; "
                "more than this process may use is clamped)")


class DeviceSpec(NamedTuple):
    """A parsed device string: its kind and, for NPUs and CUDA devices, the index asked for (else None)."""

    kind: str
    index: int | None = None


def parse_device(spec: str) -> DeviceSpec:
    """``auto``, ``cpu``, ``mps``, ``npu[:N]`` or ``cuda[:N]`` -> :class:`DeviceSpec`; UsageError otherwise."""
    m = _DEVICE_RE.match(str(spec).strip().lower())
    if not m or (m.group(2) is not None and m.group(1) not in INDEXED_KINDS):
        raise UsageError(f"unknown device {spec!r}; expected {DEVICE_CHOICES}")
    return DeviceSpec(m.group(1), None if m.group(2) is None else int(m.group(2)))


def check_cpu_only(backend: str, device: str) -> None:
    """UsageError unless ``device`` is one a CPU-only backend (ort, openvino) can run on."""
    if parse_device(device).kind not in ("auto", "cpu"):
        raise UsageError(f"the {backend} backend runs on the CPU; --device {device} needs --backend torch")


def check_ort(device: str, precision: str) -> None:
    """UsageError unless ONNX Runtime can run with ``device`` and ``precision`` (the CPU, the file's fp32)."""
    check_cpu_only("ort", device)
    if precision != "fp32":
        raise UsageError(f"the ort backend runs the file as it is; --precision {precision} needs --backend torch")


@dataclass(frozen=True)
class EngineChoice:
    backend: str  # "torch", "ort" or "openvino"
    device: DeviceSpec  # kind "auto" only where the backend is torch and no accelerator was looked for
    why: str


def choose_engine(backend: str, device: str, precision: str, *,
                  find_accelerator: Callable[[], tuple[str, str]]) -> EngineChoice:
    """The backend that runs, and why; ``auto``: PyTorch when an accelerator is there (or a device is
    asked for), ONNX Runtime where there is none (the faster engine for MODNet on a CPU).

    ``find_accelerator()`` returns (device kind, what was found, in words); it is
    called only when ``auto`` needs it. The local path asks this machine, the Ray
    path the cluster's resources.
    """
    if backend not in BACKEND_CHOICES:
        raise UsageError(f"unknown backend {backend!r}; choose from {', '.join(BACKEND_CHOICES)}")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    spec, why = parse_device(device), "asked for"
    if backend == "auto" and spec.kind != "auto":
        backend, why = "torch", f"device {device} asked for"
    elif backend == "auto":
        kind, found = find_accelerator()
        if kind == "cpu":
            backend, why = "ort", f"{found}: ONNX Runtime is the faster engine on a CPU"
        else:
            backend, why, spec = "torch", found, DeviceSpec(kind)
    if backend == "ort":
        check_ort(device, precision)
    if backend == "openvino":
        check_cpu_only(backend, device)
    if backend in ("ort", "openvino"):
        spec = DeviceSpec("cpu")
    return EngineChoice(backend, spec, why)


def _size(value: Any, max_side: int) -> SizeSpec:
    """Any way of giving a model input size, as the one parser (``imaging.parse_size_spec``) reads it."""
    if isinstance(value, ShortSide):
        text = str(value.pixels)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        text = f"{value[0]}x{value[1]}"
    else:
        text = str(value)
    try:
        return parse_size_spec(text, max_side=max_side)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def size_text(spec: SizeSpec) -> str:
    """A size as ``--size`` takes it: ``auto``, ``N`` or ``HxW``."""
    if isinstance(spec, ShortSide):
        return str(spec.pixels)
    return spec if isinstance(spec, str) else f"{spec[0]}x{spec[1]}"


def _choice(name: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise UsageError(f"--{name.replace('_', '-')}: {value!r} is not one of {', '.join(choices)}")


def compile_cache_dir(models_dir: str) -> str:
    """Where compiled packages (and inductor's scratch files) are kept: ``.compile-cache`` in the models folder."""
    return os.path.join(models_dir, ".compile-cache")


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """Everything that opens a model for matting; every value is checked when it is built (UsageError).

    ``model``: a local .onnx path, an http(s) URL or a model id (downloaded into
    ``models_dir``, checked against ``sha256``; ``offline`` never downloads;
    ``allow_synthetic`` lets the default id fall back to a generated model, whose
    mattes mean nothing). ``backend``/``device``/``precision``: see
    :func:`choose_engine`. ``model_form``: the PyTorch model run (``optimized``:
    BatchNorms folded; ``faithful``: the module-for-module port). ``size``:
    ``"auto"`` (MODNet's rule), ``N`` or an int or :class:`ShortSide` (the short
    side), ``"HxW"`` or ``(h, w)``; stored parsed. ``max_side`` bounds every model
    input side. ``threads``: 0 = automatic (:data:`THREADS_HELP`). ``compile``,
    ``graphs``: the PyTorch fast path. ``strict_fp32``: no HF32 (Ascend) / TF32 (CUDA).
    """

    model: str = DEFAULT_MODEL_ID
    sha256: str | None = None
    models_dir: str = DEFAULT_MODELS_DIR
    offline: bool = False
    allow_synthetic: bool = False
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    model_form: str = "optimized"
    size: SizeSpec = "auto"
    max_side: int = MAX_MODEL_SIDE
    threads: int = 0
    compile: bool = False
    graphs: str = "auto"
    strict_fp32: bool = False

    def __post_init__(self) -> None:
        _choice("backend", self.backend, BACKEND_CHOICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("model_form", self.model_form, MODEL_FORMS)
        _choice("graphs", self.graphs, GRAPHS_CHOICES)
        parse_device(self.device)
        if self.backend == "ort":
            check_ort(self.device, self.precision)
        if self.backend == "openvino":
            check_cpu_only(self.backend, self.device)
        if not str(self.model).strip():
            raise UsageError("--model must not be empty")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise UsageError(f"--threads must be 0 (automatic) or more, got {self.threads}")
        if isinstance(self.max_side, bool) or not isinstance(self.max_side, int) or self.max_side < SIZE_MULTIPLE:
            raise UsageError(f"--max-side must be at least {SIZE_MULTIPLE}, got {self.max_side}")
        object.__setattr__(self, "size", _size(self.size, self.max_side))


# --------------------------------------------------------------------------
# the argparse group
# --------------------------------------------------------------------------

_FLAGS = {f: "--" + f.replace("_", "-") for f in (
    "model", "sha256", "models_dir", "offline", "allow_synthetic", "backend", "device", "precision", "model_form",
    "size", "max_side", "threads", "compile", "graphs", "strict_fp32")}
ENGINE_FIELDS_KEY = "_engine_fields"  # where the parsed namespace records the fields the group added

HELP: dict[str, str] = {
    "model": "local .onnx path, http(s) URL, or model id",
    "sha256": "expected sha256 of the model file (known for the default id)",
    "models_dir": "download cache",
    "offline": "never download",
    "allow_synthetic": "when the default model cannot be downloaded, use a generated one (meaningless mattes; "
                       "for testing)",
    "backend": "inference engine; auto = PyTorch on an accelerator, ONNX Runtime on a CPU-only machine",
    "device": f"{DEVICE_CHOICES} (torch backend)",
    "precision": "torch backend precision (half precision runs the decoder, the backbone stays fp32)",
    "model_form": "torch backend: the optimized model (BatchNorms folded, fewer launches) or the faithful "
                  "module-for-module port",
    "size": "model input: auto (MODNet's rule: short side to 512 when larger, sides down to multiples of 32), "
            "N (short side to N) or HxW; a static ONNX graph on ort uses its own size",
    "max_side": "largest model input side in pixels, a guard against runaway memory",
    "threads": THREADS_HELP,
    "compile": "torch backend: compile (AOTInductor on CPU/CUDA, cached per input shape in "
               "MODELS_DIR/.compile-cache; torchair on NPU)",
    "graphs": "torch backend: capture graphs of repeated shapes on CUDA/NPU",
    "strict_fp32": "torch backend: compute fp32 convolutions in full fp32. By default an Ascend 910B runs them "
                   "in HF32 and CUDA in TF32 (faster, fine for mattes); this turns that off "
                   "(ACL_PRECISION_MODE=must_keep_origin_dtype via torch_npu set_option, no HF32/TF32)",
}
_FLAG_FIELDS = ("offline", "allow_synthetic", "compile", "strict_fp32")
_CHOICES = {"backend": BACKEND_CHOICES, "precision": PRECISIONS, "model_form": MODEL_FORMS, "graphs": GRAPHS_CHOICES}
_NUMBERS = ("max_side", "threads")


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def add_engine_arguments(parser: argparse.ArgumentParser, *, omit: Iterable[str] = (),
                         defaults: EngineOptions | None = None, help: Mapping[str, str] | None = None,
                         title: str = "engine") -> argparse._ArgumentGroup:
    """The engine options as one argparse group (every field of :class:`EngineOptions` but those in ``omit``).

    ``defaults`` changes what an option defaults to (a tool's own defaults);
    ``help`` replaces a field's help text. Read the result with :func:`engine_options_from`.
    """
    omit = set(omit)
    unknown = omit - set(_FLAGS)
    if unknown:
        raise ValueError(f"not engine options: {', '.join(sorted(unknown))}")
    d = defaults or EngineOptions()
    texts = {**HELP, **(help or {})}
    group = parser.add_argument_group(title)
    added = []
    for f in fields(EngineOptions):
        if f.name in omit:
            continue
        added.append(f.name)
        kwargs: dict[str, Any] = {"help": texts[f.name], "dest": f.name}
        value = getattr(d, f.name)
        if f.name in _FLAG_FIELDS:
            kwargs |= {"action": "store_true", "default": value}
        elif f.name in _CHOICES:
            kwargs |= {"choices": _CHOICES[f.name], "default": value}
        elif f.name in _NUMBERS:
            kwargs |= {"type": _whole_number, "default": value}
        else:
            kwargs["default"] = size_text(value) if f.name == "size" else value
        group.add_argument(_FLAGS[f.name], **kwargs)
    parser.set_defaults(**{ENGINE_FIELDS_KEY: tuple(added)})
    return group


def engine_options_from(args: argparse.Namespace, *, base: EngineOptions | None = None) -> EngineOptions:
    """The :class:`EngineOptions` of parsed arguments: the group's fields from ``args``, the rest from ``base``.

    Every value is checked here (UsageError): call it before anything slow.
    """
    given = {name: getattr(args, name) for name in getattr(args, ENGINE_FIELDS_KEY, ())}
    rest = {f.name: getattr(base, f.name) for f in fields(EngineOptions) if base is not None and f.name not in given}
    return EngineOptions(**rest, **given)
