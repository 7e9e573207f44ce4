"""Everything device-specific, in one small place: choosing a device, the lazy
``torch_npu`` import, making a device ready (:func:`activate`: current device,
the NPU's internal-format switch, strict fp32) and reading back what is in
force, synchronisation, memory statistics and a description of the machine.
The rest of the project takes a ``torch.device`` and calls these functions.

Device-type dispatch reads only ``device.type`` and ``device.index``, so the
test suite's stand-in NPU device (``tests/fake_npu.py``) goes through the same
code as a real ``torch.device``.

The module imports torch only inside the functions that use it: importing torch
takes seconds, and ``--backend auto`` on a machine with no sign of an
accelerator (:func:`find_accelerator`) decides without it, so the ONNX Runtime
and OpenVINO paths never load it.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import platform
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager

from modnet_npu.errors import ModnetError, UsageError
from modnet_npu.runtime.options import DEVICE_CHOICES, parse_device  # noqa: F401  (DEVICE_CHOICES re-exported)

if TYPE_CHECKING:
    import torch


class DeviceError(ModnetError, RuntimeError):
    """A device that was asked for and is not present."""


def import_torch_npu() -> Any:
    """Import torch_npu (registers the ``npu`` device); DeviceError with an install hint if missing."""
    try:
        import torch_npu  # noqa: F401  (import registers torch.npu)
    except ImportError as exc:
        raise DeviceError(
            "device 'npu' needs torch_npu, which is not installed here "
            f"({exc}); on an Ascend machine with CANN: pip install torch_npu==<your torch version>"
        ) from None
    except Exception as exc:  # a broken CANN install raises assorted errors on import
        raise DeviceError(f"torch_npu failed to load ({type(exc).__name__}: {exc}); check the CANN environment") from None
    return torch_npu


def _npu_available() -> bool:
    import torch
    try:
        import_torch_npu()
    except DeviceError:
        return False
    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


def _mps_available() -> bool:
    import torch
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _count(kind: str) -> int:
    import torch
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count()  # type: ignore[attr-defined]
    return 1


def _auto_device() -> torch.device:
    import torch
    if _npu_available():
        return torch.device("npu", 0)
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_present(kind: str) -> None:
    import torch
    if kind == "mps" and not _mps_available():
        raise DeviceError("device 'mps' asked for, but Apple MPS is not available on this machine")
    if kind == "npu":
        import_torch_npu()
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise DeviceError("device 'npu' asked for: torch_npu is installed but sees no NPU (check npu-smi and CANN)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' asked for, but CUDA is not available in this torch build or machine")


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` picks NPU, then CUDA, then MPS, then CPU. An explicit device that
    is missing raises DeviceError instead of silently running on the CPU."""
    import torch
    try:
        kind, index = parse_device(spec)  # the one parser of device strings
    except UsageError as exc:
        raise DeviceError(str(exc)) from None
    if kind == "auto":
        return _auto_device()
    _check_present(kind)
    if kind in ("cpu", "mps"):
        return torch.device(kind)
    i = index or 0
    if i >= _count(kind):
        raise DeviceError(f"device '{kind}:{i}' asked for, but only {_count(kind)} {kind} device(s) are present")
    return torch.device(kind, i)


# --------------------------------------------------------------------------
# is there an accelerator at all? (without importing torch)
# --------------------------------------------------------------------------

# What a GPU driver leaves on a Linux machine before any framework looks: NVIDIA's kernel module (its /proc
# entry, its device nodes; Jetson's integrated GPU; WSL's GPU paravirtualisation device) and ROCm's compute
# interface. CUDA and ROCm builds of torch find no device without these.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/nvhost-ctrl-gpu",
                    "/dev/dxg", "/dev/kfd")


def accelerator_signs() -> tuple[str, ...]:
    """What on this machine could be an accelerator that :func:`select_device` would pick, found without
    importing torch: ``torch_npu`` importable, a GPU driver's files (:data:`GPU_DRIVER_PATHS`), macOS (MPS),
    or a system whose drivers this does not read (neither Linux nor macOS). Empty: CPU only, certainly."""
    signs = ["torch_npu installed"] if importlib.util.find_spec("torch_npu") is not None else []
    if sys.platform == "darwin":  # MPS: Apple silicon, and Intel Macs with a Metal GPU on older torch builds
        signs.append("macOS (MPS)")
    elif sys.platform.startswith("linux"):
        signs += [found for pattern in GPU_DRIVER_PATHS for found in sorted(glob.glob(pattern))[:1]]
    else:
        signs.append(f"{sys.platform} (GPU drivers not looked for)")
    return tuple(signs)


def find_accelerator() -> tuple[str, str]:
    """(device kind, what was found, in words) for ``--backend auto`` on this machine.

    Where nothing hints at an accelerator (:func:`accelerator_signs`), or PyTorch
    is not installed, the answer is the CPU without importing torch; otherwise
    torch's own (:func:`select_device`).
    """
    signs = accelerator_signs()
    if not signs:
        return "cpu", "no torch_npu and no GPU driver on this machine"
    if importlib.util.find_spec("torch") is None:
        return "cpu", f"PyTorch is not installed ({', '.join(signs)} seen)"
    chosen = select_device("auto")
    if chosen.type == "cpu":
        return "cpu", f"PyTorch finds no accelerator ({', '.join(signs)} seen)"
    return chosen.type, f"accelerator {chosen} found"


# --------------------------------------------------------------------------
# making a device ready, and reading back what is in force
# --------------------------------------------------------------------------

# torch_npu options read back after activation; the values are torch_npu's own strings
NPU_OPTIONS = ("ALLOW_INTERNAL_FORMAT", "ACL_PRECISION_MODE", "ALLOW_CONV_HF32", "ALLOW_MATMUL_HF32")


@dataclass(frozen=True)
class DeviceSettings:
    """What :func:`activate` set on a device, and what was read back as in force.

    ``requested``: option -> value this process set. ``in_force``: option ->
    value read back (torch_npu options as ``_npu_getOption`` gives them, "unset"
    where nothing set one; CUDA's TF32 switches). ``current``: the device index
    made current (None on CPU and MPS). ``notes``: environment settings that
    limit this device, each with what to change.
    """

    device: str
    current: int | None = None
    requested: dict[str, str] = field(default_factory=dict)
    in_force: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception: torch_npu appends an ``[ERROR]`` line to its
    messages and inductor a whole build log, neither of which belongs in a one-line error."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _task_queue_blocker() -> str | None:
    # torch_npu reads TASK_QUEUE_ENABLE once per process; NPUGraph.capture_begin refuses level 2
    if os.environ.get("TASK_QUEUE_ENABLE") == "2":
        return "TASK_QUEUE_ENABLE=2, which NPU graph capture refuses: export TASK_QUEUE_ENABLE=1 (or 0) and start again"
    return None


def graph_capture_blocker(device: Any) -> str | None:
    """Why graph capture cannot work on ``device`` in this environment, with the fix; None if nothing blocks it."""
    return _task_queue_blocker() if device.type == "npu" else None


def npu_environment_notes() -> tuple[str, ...]:
    """Environment variables that limit what runs on the NPU, each with what to change."""
    notes = [n for n in (_task_queue_blocker(),) if n]
    if os.environ.get("ACL_OP_INIT_MODE") == "2":
        notes.append("ACL_OP_INIT_MODE=2 disables aclop operators: any operator without an aclnn kernel fails "
                     "with 'Acl op is disabled!'; export ACL_OP_INIT_MODE=0 (or 1) if that happens")
    return tuple(notes)


def _npu_strict_fp32(npu: Any) -> dict[str, str]:
    """fp32 computed as fp32 on the NPU: no fp16 or HF32 inside convolutions and matmuls."""
    out: dict[str, str] = {}
    try:
        npu.set_option({"ACL_PRECISION_MODE": "must_keep_origin_dtype"})
        out["ACL_PRECISION_MODE"] = "must_keep_origin_dtype"
    except Exception as exc:  # set_option checks the value only; CANN's own errors come later (read_back)
        out["ACL_PRECISION_MODE"] = f"not set ({one_line(exc)})"
    npu.conv.allow_hf32 = False
    npu.matmul.allow_hf32 = False
    return out | {"ALLOW_CONV_HF32": "disable", "ALLOW_MATMUL_HF32": "disable"}


def _activate_npu(device: Any, strict_fp32: bool) -> dict[str, str]:
    npu = import_torch_npu().npu
    # Options first, before anything can initialise the device: torch_npu may read an
    # option once at its first use. With internal formats allowed (torch_npu 2.9.0.post1's
    # default on 910B1-B4) convolutions take the aclop path, which graph capture refuses;
    # disabled, they take aclnn, which it captures. Written through the config object
    # (the attribute is write-only; read_back reads the option itself).
    npu.config.allow_internal_format = False
    requested = {"ALLOW_INTERNAL_FORMAT": "disable"}
    if strict_fp32:
        requested |= _npu_strict_fp32(npu)
    if device.index is not None:
        npu.set_device(device.index)
    return requested


def _new_tf32_api() -> bool:
    """Whether this torch has the ``fp32_precision`` switches (2.9 and later); once anything sets them,
    reading the legacy ``allow_tf32`` flags raises, so where they exist they are the only ones used."""
    import torch
    conv = getattr(torch.backends.cudnn, "conv", None)
    return conv is not None and hasattr(conv, "fp32_precision") and hasattr(torch.backends.cuda.matmul,
                                                                             "fp32_precision")


def _activate_cuda(device: Any, strict_fp32: bool) -> dict[str, str]:
    import torch
    requested: dict[str, str] = {}
    if strict_fp32 and _new_tf32_api():  # CUDA convolutions default to TF32: a 10-bit mantissa hides converter bugs
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        requested = {"cudnn.conv.fp32_precision": "ieee", "cuda.matmul.fp32_precision": "ieee"}
    elif strict_fp32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        requested = {"cudnn.allow_tf32": "False", "cuda.matmul.allow_tf32": "False"}
    if device.index is not None:
        torch.cuda.set_device(device.index)
    return requested


def activate(device: Any, *, strict_fp32: bool = False) -> DeviceSettings:
    """Make ``device`` ready for a model; call it before anything touches the device.

    * The device becomes current (``set_device``): side streams, graph capture,
      ``synchronize()`` without an argument and torchair all act on the current
      device, which is device 0 unless told otherwise.
    * NPU: internal formats off, always (graph capture needs it; see
      ``_activate_npu``); TASK_QUEUE_ENABLE / ACL_OP_INIT_MODE checked (``notes``).
    * ``strict_fp32`` (parity runs): NPU ``ACL_PRECISION_MODE=must_keep_origin_dtype``
      and no HF32; CUDA no TF32. Without it the device's defaults stay in force:
      on a 910B and on CUDA fp32 convolutions then run in HF32 / TF32.

    Calling it again is harmless. The returned ``in_force`` is read at once; CANN
    applies some options only at device initialisation, so read them again
    with :func:`read_back` after the first device operation.
    """
    if device.type == "npu":
        requested = _activate_npu(device, strict_fp32)
        notes = npu_environment_notes()
    elif device.type == "cuda":
        requested, notes = _activate_cuda(device, strict_fp32), ()
    else:
        requested, notes = {}, ()
    return DeviceSettings(str(device), current_index(device), requested, read_back(device), notes)


def prepare(device: Any, strict_fp32: bool = True) -> dict[str, str]:
    """:func:`activate`, as the flat ``option -> value`` it set (the older call; new code calls activate)."""
    return dict(activate(device, strict_fp32=strict_fp32).requested)


def current_index(device: Any) -> int | None:
    """The current device index of ``device``'s kind (None on CPU and MPS)."""
    if device.type in ("cuda", "npu"):
        return int(_module(device).current_device())
    return None


def read_back(device: Any) -> dict[str, str]:
    """The precision and format options in force on ``device``'s kind, as the device stack reports them."""
    import torch
    if device.type == "npu":
        get = import_torch_npu()._C._npu_getOption  # bytes, or None where never set
        values = {name: get(name) for name in NPU_OPTIONS}
        return {k: "unset" if v is None else v.decode() for k, v in values.items()}
    if device.type == "cuda" and _new_tf32_api():  # "tf32", "ieee", or "none" (the parent setting)
        return {"cudnn.conv.fp32_precision": str(torch.backends.cudnn.conv.fp32_precision),
                "cuda.matmul.fp32_precision": str(torch.backends.cuda.matmul.fp32_precision)}
    if device.type == "cuda":
        return {"cudnn.allow_tf32": str(torch.backends.cudnn.allow_tf32),
                "cuda.matmul.allow_tf32": str(torch.backends.cuda.matmul.allow_tf32)}
    return {}


def check_bf16(device: Any) -> None:
    """DeviceError when ``device`` cannot run bfloat16 (the original Ascend 910, CUDA before Ampere)."""
    import torch
    if device.type == "npu":
        ok = bool(torch.npu.is_bf16_supported())  # type: ignore[attr-defined]  (no arguments in torch_npu)
    elif device.type == "cuda":
        try:
            ok = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch before 2.4 has no emulation flag
            ok = bool(torch.cuda.is_bf16_supported())
    else:
        return
    if not ok:
        raise DeviceError(f"--precision bf16 asked for, but {device} ({device_name(device)}) has no bfloat16 "
                          "support (the original Ascend 910 has none); use --precision fp16 or fp32")


# --------------------------------------------------------------------------
# synchronisation and memory
# --------------------------------------------------------------------------


def _module(device: Any) -> Any:
    import torch
    return getattr(torch, device.type, None) if device.type in ("cuda", "npu", "mps") else None


def current(device: Any) -> ContextManager[Any]:
    """A context in which ``device`` is the current device of its kind (a no-op on CPU and MPS).

    The current device is per thread: :func:`activate` sets it for the thread that
    builds the engine, this for the threads that later call it (a service's workers).
    """
    if device is not None and device.type in ("cuda", "npu") and device.index is not None:
        return _module(device).device(device.index)
    return contextlib.nullcontext()


def synchronize(device: Any) -> None:
    """Wait for the work queued on ``device`` itself (not on whichever device is current),
    so timings measure the computation and not its launch."""
    import torch
    if device.type in ("cuda", "npu"):
        _module(device).synchronize(device.index)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: Any) -> None:
    mod = _module(device)
    if mod is not None and hasattr(mod, "reset_peak_memory_stats"):
        mod.reset_peak_memory_stats(device.index)


def allocated_mb(device: Any) -> float | None:
    """Memory the framework holds allocated on the device now (graphs' pools included), or None on CPU/MPS."""
    mod = _module(device)
    if mod is None or device.type == "mps" or not hasattr(mod, "memory_allocated"):
        return None
    return float(mod.memory_allocated(device.index)) / 2**20


def peak_memory_mb(device: Any) -> float | None:
    """Peak memory the framework allocated on the device since the last reset, or None on CPU."""
    import torch
    mod = _module(device)
    if mod is None:
        return None
    if device.type == "mps":
        return float(torch.mps.driver_allocated_memory()) / 2**20
    return float(mod.max_memory_allocated(device.index)) / 2**20


def process_rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process, in MiB."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak_kb / 2**20 if sys.platform == "darwin" else peak_kb / 1024  # macOS reports bytes
    current = peak
    try:
        with open("/proc/self/statm") as fh:
            current = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return round(current, 1), round(peak, 1)


def device_name(device: Any) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index)
    if device.type == "npu":
        return str(torch.npu.get_device_name(device.index))  # type: ignore[attr-defined]
    if device.type == "mps":
        return "Apple MPS"
    return cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cann_version() -> str | None:
    """The CANN version: torch_npu's own answer when it has one, else the toolkit's install folder."""
    utils = getattr(getattr(sys.modules.get("torch_npu"), "npu", None), "utils", None)
    get = getattr(utils, "get_cann_version", None)
    if get is not None:
        try:
            version = get()  # "" where the runtime does not know (aclsysGetCANNVersion missing)
        except Exception:  # an older CANN runtime without the call: fall back to the files
            version = ""
        if version:
            return str(version)
    return _cann_version_from_files()


def _cann_version_from_files() -> str | None:
    for root in (os.environ.get("ASCEND_TOOLKIT_HOME"), "/usr/local/Ascend/ascend-toolkit/latest"):
        if not root:
            continue
        for name in ("version.cfg", "compiler/version.info", "runtime/version.info"):
            path = os.path.join(root, name)
            try:
                with open(path) as fh:
                    for line in fh:
                        if "version" in line.lower() and "=" in line:
                            return line.split("=", 1)[1].strip()
            except OSError:
                continue
    return None


@dataclass(frozen=True)
class Environment:
    python: str
    torch: str
    torch_npu: str | None
    cann: str | None
    onnxruntime: str
    onnx: str
    device: str
    device_name: str
    cpu_model: str
    cpu_count: int
    os: str


def environment(device: torch.device) -> Environment:
    import torch
    import onnx
    import onnxruntime

    npu_version = None
    if "torch_npu" in sys.modules:
        npu_version = getattr(sys.modules["torch_npu"], "__version__", "unknown")
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        torch_npu=npu_version,
        cann=cann_version() if device.type == "npu" else None,
        onnxruntime=onnxruntime.__version__,
        onnx=onnx.__version__,
        device=str(device),
        device_name=device_name(device),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count() or 1,
        os=platform.platform(),
    )
