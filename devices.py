"""Everything device-specific, in one small place: choosing a device, the lazy
``torch_npu`` import, strict-fp32 settings, synchronisation, memory statistics
and a description of the machine. The rest of the project takes a
``torch.device`` and calls these functions.
"""
from __future__ import annotations

import os
import platform
import re
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch
from errors import ModnetError

DEVICE_CHOICES = "auto|npu|npu:N|cuda|cuda:N|mps|cpu"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|npu|cuda)(?::(\d+))?$")


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
    try:
        import_torch_npu()
    except DeviceError:
        return False
    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count()  # type: ignore[attr-defined]
    return 1


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` picks NPU, then CUDA, then MPS, then CPU. An explicit device that
    is missing raises DeviceError instead of silently running on the CPU."""
    m = _DEVICE_RE.match(spec.strip().lower())
    if not m:
        raise DeviceError(f"unknown device {spec!r}; expected {DEVICE_CHOICES}")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        if _npu_available():
            return torch.device("npu", 0)
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' asked for, but Apple MPS is not available on this machine")
        return torch.device("mps")
    if kind == "npu":
        import_torch_npu()
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise DeviceError("device 'npu' asked for: torch_npu is installed but sees no NPU (check npu-smi and CANN)")
    elif not torch.cuda.is_available():
        raise DeviceError("device 'cuda' asked for, but CUDA is not available in this torch build or machine")
    i = int(index or 0)
    if i >= _count(kind):
        raise DeviceError(f"device '{kind}:{i}' asked for, but only {_count(kind)} {kind} device(s) are present")
    return torch.device(kind, i)


def prepare(device: torch.device, strict_fp32: bool = True) -> dict[str, str]:
    """Make the device compute fp32 as fp32 (for a parity run); returns what was set.

    Original Ascend 910 parts run convolutions in fp16 by default
    (ACL precision mode allow_fp32_to_fp16) and ``conv.allow_hf32`` defaults on;
    CUDA allows TF32 for convolutions. Either would hide converter bugs behind
    rounding, so the parity run switches them off.
    """
    settings: dict[str, str] = {}
    if not strict_fp32:
        return settings
    if device.type == "npu":
        torch_npu = import_torch_npu()
        try:
            torch_npu.npu.set_option({"ACL_PRECISION_MODE": "must_keep_origin_dtype"})
            settings["ACL_PRECISION_MODE"] = "must_keep_origin_dtype"
        except Exception as exc:  # older CANN: report, do not hide
            settings["ACL_PRECISION_MODE"] = f"not set ({exc})"
        torch_npu.npu.conv.allow_hf32 = False
        torch_npu.npu.matmul.allow_hf32 = False
        settings |= {"conv.allow_hf32": "False", "matmul.allow_hf32": "False"}
    elif device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        settings |= {"cudnn.allow_tf32": "False", "cuda.matmul.allow_tf32": "False"}
    return settings


def _module(device: torch.device) -> Any:
    return getattr(torch, device.type, None) if device.type in ("cuda", "npu", "mps") else None


def synchronize(device: torch.device) -> None:
    """Wait for queued work, so timings measure the computation and not its launch."""
    mod = _module(device)
    if mod is not None:
        mod.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    mod = _module(device)
    if mod is not None and hasattr(mod, "reset_peak_memory_stats"):
        mod.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory the framework allocated on the device since the last reset, or None on CPU."""
    mod = _module(device)
    if mod is None:
        return None
    if device.type == "mps":
        return float(torch.mps.driver_allocated_memory()) / 2**20
    return float(mod.max_memory_allocated(device)) / 2**20


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return str(torch.npu.get_device_name(device))  # type: ignore[attr-defined]
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
    """The CANN toolkit version, read from its install folder when present."""
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
