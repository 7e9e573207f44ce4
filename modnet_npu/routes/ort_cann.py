"""The ``ort-cann`` route: ONNX Runtime's CANN execution provider (the ``onnxruntime-cann`` wheel) on the ONNX file.

Three traps, each checked here rather than trusted:

* ``onnxruntime-cann`` lists ``CANNExecutionProvider`` as available even where
  CANN is absent; a session asking for it then prints an error and **falls back
  to the CPU** (``get_providers()`` -> ``['CPUExecutionProvider']``). A session
  that fell back is refused (one line with the reason ONNX Runtime printed),
  never timed as if it ran on the NPU. Fallback while *running* is switched off
  (``disable_fallback``), so a failure on the NPU raises instead of quietly
  moving the session to the CPU.
* The provider passes a precision mode to GE only when given one, and GE's
  default is ``force_fp16``: the fp32 route says ``must_keep_origin_dtype``
  explicitly; ``native`` leaves it unset and is reported as GE's default.
* ``dump_om_model`` defaults on and writes ``.om`` files into the working
  folder: it is turned off.

Option keys are those of onnxruntime-cann 1.24.4 (read from its binary; an
unknown key makes the provider fail, which ONNX Runtime turns into the CPU
fallback). ONNX Runtime's main branch has since renamed ``precision_mode`` to
``precision_mode_v2`` (values ``origin``, ``fp16`` ...): when the provider
refuses the first key, the second is tried.
"""
from __future__ import annotations

import re
import time
from typing import Any

import numpy as np

from modnet_npu.cli import one_line
from modnet_npu.routes.base import RouteFailedError, RouteSetup, RouteUnavailableError, FirstRun
from modnet_npu.routes.output import captured_output, version_of

PROVIDER = "CANNExecutionProvider"
DISTRIBUTION = "onnxruntime-cann"
# The fp32-keeping mode under each key a provider version knows, in the order tried.
FP32_MODES: tuple[tuple[str, str], ...] = (("precision_mode", "must_keep_origin_dtype"), ("precision_mode_v2", "origin"))
NATIVE_MODE = "not set: GE's default (force_fp16)"
INSTALL_HINT = (f"pip uninstall onnxruntime && pip install 'numpy<2' {DISTRIBUTION} (it provides the same onnxruntime "
                "module; it needs the CANN toolkit: see docs/ASCEND.md)")
CANN_HINT = ("install CANN and source its environment (e.g. . /usr/local/Ascend/ascend-toolkit/set_env.sh), "
             "then check the NPU with npu-smi info")


def check_installed() -> Any:
    """The ``onnxruntime`` module when it offers the CANN provider; RouteUnavailableError naming the wheel otherwise."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RouteUnavailableError(f"ort-cann: onnxruntime cannot be imported ({one_line(str(exc))}); "
                                    f"{INSTALL_HINT}") from None
    available = list(ort.get_available_providers())
    if PROVIDER not in available:
        raise RouteUnavailableError(
            f"ort-cann: onnxruntime {ort.__version__} has no {PROVIDER} (it offers {', '.join(available)}): "
            f"the route needs {DISTRIBUTION}; {INSTALL_HINT}")
    return ort


def provider_options(*, device_id: int, precision: str, mode: tuple[str, str] | None = None) -> dict[str, str]:
    """The options given to the provider: the device, no .om dumps, and the fp32-keeping mode unless ``native``."""
    options = {"device_id": str(device_id), "dump_om_model": "0"}  # on by default: it writes .om files here
    if precision == "fp32":
        key, value = mode or FP32_MODES[0]
        options[key] = value
    return options


def fallback_reason(printed: str) -> str:
    """Why ONNX Runtime dropped the provider, from what it printed (the library's own words), or ""."""
    for pattern in (r"Unknown provider option:?\s*\"?[\w.]+\"?", r"with error: ([^\n]+)",
                    r"EP Error:? ([^\n]+?) when using", r"EP Error:? ([^\n]+)"):
        m = re.search(pattern, printed)
        if m:
            return one_line(m.group(m.lastindex or 0), 300)
    return ""


def _session(ort: Any, model_path: str, options: dict[str, str], threads: int) -> tuple[Any, str]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)  # for the nodes the provider leaves to the CPU
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")  # which nodes the NPU took
    so.log_severity_level = 3
    with captured_output() as printed:
        session = ort.InferenceSession(model_path, so, providers=[(PROVIDER, options), "CPUExecutionProvider"])
    return session, printed[0]


def _in_use(session: Any) -> bool:
    providers = list(session.get_providers())
    return bool(providers) and providers[0] == PROVIDER


def open_session(ort: Any, model_path: str, *, device_id: int, precision: str, threads: int
                 ) -> tuple[Any, dict[str, str]]:
    """A session whose first provider is CANN, with the options it took; RouteUnavailableError if it fell back."""
    modes = FP32_MODES if precision == "fp32" else (None,)
    printed = ""
    for mode in modes:
        options = provider_options(device_id=device_id, precision=precision, mode=mode)
        session, printed = _session(ort, model_path, options, threads)
        if _in_use(session):
            session.disable_fallback()  # a failure on the NPU while running must raise, not move to the CPU
            return session, options
        if not (mode and re.search(rf"Unknown provider option:?\s*\"?{mode[0]}\b", printed)):
            break  # not a renamed key: another key would fall back the same way
    reason = fallback_reason(printed)
    raise RouteUnavailableError(
        f"ort-cann: the CANN execution provider is not in use: ONNX Runtime fell back to the CPU "
        f"(get_providers() = {list(session.get_providers())})" + (f": {reason}" if reason else "")
        + f"; {CANN_HINT}")


def nodes_by_provider(session: Any) -> dict[str, int] | None:
    """How many of the graph's nodes each provider took (None where ONNX Runtime cannot say)."""
    get = getattr(session, "get_provider_graph_assignment_info", None)
    if get is None:
        return None
    try:
        info = get()
    except Exception:  # an ONNX Runtime that does not record assignments
        return None
    counts: dict[str, int] = {}
    for sub in info:
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts


class OrtCannRoute:
    """ONNX Runtime with the CANN provider on NPU ``device_id``; host arrays in and out."""

    name = "ort-cann"

    def __init__(self, model_path: str, *, device_id: int, precision: str, shape: tuple[int, ...],
                 threads: int = 1) -> None:
        ort = check_installed()
        start = time.perf_counter()
        self.session, self.options = open_session(ort, model_path, device_id=device_id, precision=precision,
                                                  threads=threads)
        self.load_s = time.perf_counter() - start
        self.nodes = nodes_by_provider(self.session)
        if self.nodes is not None and not self.nodes.get(PROVIDER):
            raise RouteUnavailableError(f"ort-cann: the CANN execution provider took none of the graph's "
                                        f"{sum(self.nodes.values())} nodes: all of it would run on the CPU")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.version, self.device_id, self.precision = ort.__version__, device_id, precision
        start = time.perf_counter()
        self.run(np.zeros(shape, np.float32))  # the graph is built for this shape at its first run
        self.first_call_ms = (time.perf_counter() - start) * 1000.0

    def run(self, x: np.ndarray) -> np.ndarray:
        """The graph's own output ``(N, 1, h, w)``; a fixed-batch graph takes a batch image by image."""
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            return np.concatenate([self.run(x[i: i + 1]) for i in range(x.shape[0])])
        try:
            return self.session.run(None, {self.input_name: x})[0]
        except Exception as exc:  # fallback is off: an NPU failure arrives here instead of a silent CPU run
            raise RouteFailedError(f"ort-cann: running the model failed: {one_line(str(exc), 300)}") from None

    call = run

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.run(x), np.float32)[:, 0]

    def setup(self) -> RouteSetup:
        from modnet_npu.runtime.devices import cann_version

        reported = self.session.get_provider_options().get(PROVIDER, {})
        key = next((k for k, _ in FP32_MODES if k in self.options), None)
        notes = [] if self.nodes is None else [
            "nodes per provider: " + ", ".join(f"{k} {v}" for k, v in sorted(self.nodes.items()))]
        return RouteSetup(
            runtime=f"ONNX Runtime {self.version}, {PROVIDER}",
            versions={"onnxruntime": self.version, DISTRIBUTION: version_of(DISTRIBUTION), "cann": cann_version()},
            device=f"npu:{self.device_id}", precision=self.precision,
            precision_mode=f"{key}={self.options[key]}" if key else NATIVE_MODE,
            # as the provider reports them back, else as given
            options={"given": dict(self.options), "in_force": dict(reported) or None,
                     "nodes_by_provider": self.nodes},
            notes=tuple(notes))

    def first_run(self) -> FirstRun:
        return FirstRun(load_s=self.load_s, first_call_ms=self.first_call_ms,
                        note="load: session creation (provider set-up); first call: graph build and run")

    def close(self) -> None:
        self.session = None
