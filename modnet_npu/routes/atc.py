"""ATC, CANN's offline model compiler: the ONNX file -> an ``.om`` for one chip, one input shape, one precision.

The command for a static graph (``--framework=5`` is ONNX)::

    atc --model=M.onnx --framework=5 --output=DIR/modnet --input_format=NCHW
        --input_shape="<input name>:1,3,H,W" --soc_version=<chip> --precision_mode_v2=origin

ATC computes in fp16 unless told otherwise (``--precision_mode`` defaults to
``force_fp16``, ``--precision_mode_v2`` to ``fp16``). The fp32 route keeps the
graph's own types: ``--precision_mode_v2=origin``, or on a toolkit too old to
know that flag (its log names it), the older ``--precision_mode=must_keep_origin_dtype``
(the two are mutually exclusive). ``native`` passes neither: ATC's default.

The chip (``--soc_version``) is ``--soc-version`` when given, else what the
device says: torch_npu's ``get_device_name`` (the SoC name itself, e.g.
``Ascend910B3``) once the torch route has the NPU, else the ``Name`` column of
``npu-smi info`` (``910B3``, prefixed ``Ascend``).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from modnet_npu.cli import one_line
from modnet_npu.routes.base import RouteFailedError, RouteUnavailableError
from modnet_npu.routes.cache import CacheEntry, cache_key, entry_for, locked

FRAMEWORK_ONNX = 5
FP32_FLAGS: tuple[str, ...] = ("--precision_mode_v2=origin", "--precision_mode=must_keep_origin_dtype")
NATIVE_MODE = "not set: ATC's default (precision_mode force_fp16 / precision_mode_v2 fp16)"
TOOLKIT_HINT = ("it comes with the CANN toolkit (no package index carries it): install the toolkit and source its "
                "environment, e.g. . /usr/local/Ascend/ascend-toolkit/set_env.sh")


def find_atc() -> str:
    """The ``atc`` executable on PATH; RouteUnavailableError otherwise."""
    path = shutil.which("atc")
    if path is None:
        raise RouteUnavailableError(f"om: ATC (atc) is not on PATH; {TOOLKIT_HINT}")
    return path


# --------------------------------------------------------------------------
# the chip
# --------------------------------------------------------------------------

_NPU_SMI_ROW = re.compile(r"^\|\s*(\d+)\s+([0-9]{3}[0-9A-Za-z_]*)\s+\|")


def soc_from_npu_smi(text: str, device_index: int) -> str | None:
    """``Ascend<Name>`` of NPU ``device_index`` (else the first) in ``npu-smi info``'s table, or None."""
    rows = [(int(m.group(1)), m.group(2)) for m in map(_NPU_SMI_ROW.match, text.splitlines()) if m]
    if not rows:
        return None
    name = next((n for i, n in rows if i == device_index), rows[0][1])
    return name if name.startswith("Ascend") else f"Ascend{name}"


def _npu_smi(device_index: int) -> str | None:
    exe = shutil.which("npu-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return soc_from_npu_smi(done.stdout, device_index) if done.returncode == 0 else None


def _torch_npu_soc(device_index: int) -> str | None:
    # only once torch_npu is loaded: asking it initialises the device, which the torch route does first
    npu = getattr(sys.modules.get("torch_npu"), "npu", None)
    if npu is None:
        return None
    try:
        name = str(npu.get_device_name(device_index))
    except Exception:  # no NPU visible to torch_npu
        return None
    return name if name.startswith("Ascend") else None


def soc_sources_present() -> bool:
    """Whether the chip can be asked at all (checked before the slow steps)."""
    return shutil.which("npu-smi") is not None or importlib.util.find_spec("torch_npu") is not None


def resolve_soc(given: str | None, device_index: int) -> tuple[str, str]:
    """(SoC version, where it came from); RouteUnavailableError asking for ``--soc-version`` when nothing says."""
    if given:
        return given, "--soc-version"
    for source, ask in (("torch_npu.npu.get_device_name", _torch_npu_soc), ("npu-smi info", _npu_smi)):
        soc = ask(device_index)
        if soc:
            return soc, source
    raise RouteUnavailableError("om: cannot tell the chip for ATC's --soc_version (neither torch_npu nor npu-smi "
                                "answered); pass --soc-version, e.g. --soc-version Ascend910B3")


# --------------------------------------------------------------------------
# compiling, cached
# --------------------------------------------------------------------------


def atc_argv(atc: str, *, model: str, output: str, input_name: str, shape: Sequence[int], soc_version: str,
             precision_flag: str | None) -> list[str]:
    argv = [atc, f"--model={os.path.abspath(model)}", f"--framework={FRAMEWORK_ONNX}", f"--output={output}",
            "--input_format=NCHW", f"--input_shape={input_name}:{','.join(str(d) for d in shape)}",
            f"--soc_version={soc_version}"]
    return argv + ([precision_flag] if precision_flag else [])


@dataclass(frozen=True)
class Compiled:
    om_path: str
    atc_s: float  # this compile's time, or on a cache hit the time of the compile that made it
    cached: bool
    argv: tuple[str, ...]
    log_path: str
    precision_flag: str | None
    soc_version: str
    shape: tuple[int, ...]


def _run_atc(argv: list[str], log_path: str) -> tuple[int, float]:
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return done.returncode, time.perf_counter() - start


def _first_error(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as fh:
            lines = [ln.strip() for ln in fh if ln.strip() and not ln.startswith("$ ")]
    except OSError:
        return ""
    found = next((ln for ln in lines if re.search(r"\bE[0-9A-Z]{5}\b|ERROR|[Ee]rror|[Ff]ailed", ln)), "")
    return one_line(found, 240)


def _refuses(log_path: str, flag: str) -> bool:
    """Whether ATC's output of the last attempt (not the command line written above it) names ``flag``."""
    name = flag.split("=", 1)[0].lstrip("-")
    try:
        with open(log_path, errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return False
    last = max((i for i, ln in enumerate(lines) if ln.startswith("$ ")), default=-1)
    return bool(name) and any(name in ln for ln in lines[last + 1:])


def _compile(entry: CacheEntry, argv_for: Callable[[str | None], list[str]], flags: Sequence[str | None],
             log: Callable[[str], None]) -> tuple[list[str], float, str | None]:
    """Run ATC into ``entry``; on a toolkit that refuses the first precision flag, once more with the next."""
    entry.clear()
    for i, flag in enumerate(flags):
        argv = argv_for(flag)
        rc, seconds = _run_atc(argv, entry.log_path)
        if rc == 0 and entry.om_files():
            return argv, seconds, flag
        if i + 1 < len(flags) and _refuses(entry.log_path, flag or ""):
            log(f"om: ATC refused {flag}: trying {flags[i + 1]}")
            continue
        for path in entry.om_files():  # half-written output must not look usable
            os.unlink(path)
        why = _first_error(entry.log_path)
        raise RouteFailedError(f"om: ATC failed (exit {rc})" + (f": {why}" if why else "")
                               + f"; its log: {entry.log_path}")
    raise AssertionError("unreachable: the last flag either succeeds or raises")


def compile_om(*, atc: str, model: str, model_sha256: str, input_name: str, shape: Sequence[int],
               soc_version: str, precision: str, cache_dir: str, log: Callable[[str], None] = lambda m: None
               ) -> Compiled:
    """The .om for this model, shape, chip and precision: from the cache, else compiled by ATC (and cached)."""
    flags: Sequence[str | None] = FP32_FLAGS if precision == "fp32" else (None,)
    options = [f"--framework={FRAMEWORK_ONNX}", "--input_format=NCHW", f"precision={precision}"]
    key = cache_key(model_sha256=model_sha256, input_name=input_name, shape=shape, soc_version=soc_version,
                    options=options, atc=os.path.realpath(atc))
    entry = entry_for(cache_dir, soc_version=soc_version, shape=shape, key=key)
    shape = tuple(int(d) for d in shape)
    with locked(entry):
        meta = entry.read_meta()
        if meta is not None:
            log(f"om: {soc_version} {shape[-2]}x{shape[-1]} from the cache ({entry.folder})")
            return Compiled(os.path.join(entry.folder, meta["om"]), float(meta["atc_s"]), True, tuple(meta["argv"]),
                            entry.log_path, meta.get("precision_flag"), soc_version, shape)
        log(f"om: compiling for {soc_version} at {shape[-2]}x{shape[-1]} with ATC (log: {entry.log_path})")

        def argv_for(flag: str | None) -> list[str]:
            return atc_argv(atc, model=model, output=entry.output, input_name=input_name, shape=shape,
                            soc_version=soc_version, precision_flag=flag)

        argv, seconds, flag = _compile(entry, argv_for, flags, log)
        om = os.path.basename(entry.om_files()[0])
        entry.write_meta({"om": om, "atc_s": round(seconds, 3), "argv": argv, "precision_flag": flag,
                          "model_sha256": model_sha256, "soc_version": soc_version, "shape": list(shape),
                          "key": key, "compiled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return Compiled(os.path.join(entry.folder, om), seconds, False, tuple(argv), entry.log_path, flag,
                    soc_version, shape)
