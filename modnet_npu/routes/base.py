"""What every route shares: its errors, its precision modes, and the frozen results the report is built from.

A *route* is one way to run MODNet's ONNX file on an Ascend NPU: ``torch``
(the converted PyTorch model through torch_npu, this project's own path),
``ort-cann`` (ONNX Runtime's CANN execution provider on the file itself) and
``om`` (the file compiled offline by ATC and run by ais_bench or ACL). Each
route takes normalised ``(N, 3, h, w)`` float32 input on the host and gives
``(N, h, w)`` float32 alpha back on the host, so all of them are checked and
timed the same way (:mod:`modnet_npu.routes.measure`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from modnet_npu.errors import ModnetError, UsageError

ROUTES: tuple[str, ...] = ("torch", "ort-cann", "om")
ROUTE_PRECISIONS: tuple[str, ...] = ("fp32", "native")

# GE (CANN's graph engine) reads its precision mode once per process, at its first
# initialisation: later sessions in the same process run with that mode whatever
# they ask for. Written into every routes report that has an NPU route.
GE_ONCE_NOTE = (
    "GE initialises once per process and the precision mode of its first initialisation holds for every "
    "later session in that process: compare precisions in separate runs (the om route's precision is "
    "compiled into its .om by ATC, in ATC's own process, and is not affected)"
)


class RouteUnavailableError(ModnetError):
    """A route asked for by name cannot run here: one line saying why (nothing of it is timed)."""


class RouteFailedError(ModnetError):
    """A route that was available failed while compiling, loading or running the model."""


def parse_routes(text: str) -> tuple[str, ...]:
    """``"torch,om"`` -> ``("torch", "om")``: known names only, each once, in the order given; UsageError else."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--routes needs at least one of {', '.join(ROUTES)}")
    unknown = [n for n in names if n not in ROUTES]
    if unknown:
        raise UsageError(f"unknown route {unknown[0]!r}; choose from {', '.join(ROUTES)} (comma-separated)")
    return tuple(dict.fromkeys(names))


def check_route_precision(precision: str) -> str:
    if precision not in ROUTE_PRECISIONS:
        raise UsageError(f"unknown route precision {precision!r}; choose from {', '.join(ROUTE_PRECISIONS)}")
    return precision


class Route(Protocol):
    """One opened route: ``infer`` for parity, ``call`` for timing (host array in, host array out)."""

    name: str

    def infer(self, x: np.ndarray) -> np.ndarray: ...

    def call(self, x: np.ndarray) -> object: ...

    def setup(self) -> "RouteSetup": ...

    def first_run(self) -> "FirstRun": ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------
# what a route reports
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteSetup:
    """What ran: the runtime and its versions, the device, the precision in force and every option set."""

    runtime: str  # one phrase, e.g. "ONNX Runtime 1.24.4, CANNExecutionProvider"
    versions: dict[str, str | None]
    device: str
    precision: str  # "fp32" (kept by the mode below) or "native" (the route's own default, fp16 for GE/ATC)
    precision_mode: str  # the mode in force as the route was told it, e.g. "precision_mode=must_keep_origin_dtype"
    options: dict[str, Any]  # every option in force (read back where the runtime reports them)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FirstRun:
    """What a route costs before its first answer (seconds/ms as named; None: does not apply or not measured)."""

    atc_s: float | None = None  # ATC's compile time; on a cache hit the time of the compile that made it
    atc_cached: bool | None = None
    load_s: float | None = None  # session creation / model load (ORT-CANN: provider set-up and graph build)
    first_call_ms: float | None = None  # the first inference at the benchmark's shape (graph compile included)
    note: str | None = None


@dataclass(frozen=True)
class RouteParity:
    """The route's mattes against ONNX Runtime CPU's on every parity case."""

    cases: int
    cases_passing: int
    worst_case: str
    mae: float  # of the worst case (by max error)
    max_error: float
    mean_mae: float
    thresholds: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.cases_passing == self.cases


@dataclass(frozen=True)
class RouteResult:
    name: str
    setup: RouteSetup
    parity: RouteParity
    latency: Any  # report.LatencyStats of the interleaved batch-1 runs, host in, host out
    first_run: FirstRun
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the OM runtime's own device times

    def to_dict(self) -> dict[str, Any]:
        return {"setup": asdict(self.setup), "parity": {**asdict(self.parity), "passed": self.parity.passed},
                "latency": asdict(self.latency), "throughput_images_per_s": self.latency.fps,
                "first_run": asdict(self.first_run), **self.extra}


@dataclass(frozen=True)
class RoutesReport:
    """Every route side by side, from one interleaved loop with ONNX Runtime CPU as the common reference."""

    routes: tuple[RouteResult, ...]
    reference: Any  # report.LatencyStats of ONNX Runtime CPU in the same loop
    size: tuple[int, int]
    runs: int
    warmup: int
    timed_call: str
    noise: dict[str, Any]
    notes: tuple[str, ...] = ()
    times: dict[str, list[float]] = field(default_factory=dict, compare=False, repr=False)  # every timed run, ms

    @property
    def failing(self) -> list[str]:
        return [r.name for r in self.routes if not r.parity.passed]

    def to_dict(self) -> dict[str, Any]:
        """The report's ``routes`` section."""
        return {
            "size": list(self.size), "runs": self.runs, "warmup": self.warmup, "batch_size": 1,
            "interleaved": True, "timed_call": self.timed_call, "ort_cpu": asdict(self.reference),
            **self.noise, "notes": list(self.notes),
            "routes": {r.name: {**r.to_dict(), "speedup_vs_ort_cpu_median": self.reference.median_ms
                                / r.latency.median_ms} for r in self.routes},
        }

    def table(self) -> str:
        """The routes side by side, as the command prints them."""
        from modnet_npu.proof.report import markdown_table

        ref = self.reference
        rows = [("route", "runtime", "precision", "parity: worst MAE / max", "median", "p90", "img/s",
                 "vs ORT CPU", "first run"),
                ("ORT CPU (reference)", "onnxruntime, CPU", "fp32", "-", f"{ref.median_ms:.2f} ms",
                 f"{ref.p90_ms:.2f} ms", f"{ref.fps:.2f}", "x1.00", "-")]
        for r in self.routes:
            p, lat = r.parity, r.latency
            rows.append((r.name, r.setup.runtime, f"{r.setup.precision} ({r.setup.precision_mode})",
                         f"{p.mae:.3g} / {p.max_error:.3g} {'PASS' if p.passed else 'FAIL'}"
                         + ("" if p.cases == 1 else f" ({p.cases_passing}/{p.cases})"),
                         f"{lat.median_ms:.2f} ms", f"{lat.p90_ms:.2f} ms", f"{lat.fps:.2f}",
                         f"x{ref.median_ms / lat.median_ms:.2f}", describe_first_run(r.first_run)))
        head = (f"routes at {self.size[0]}x{self.size[1]}, batch 1, {self.runs} interleaved runs each "
                f"({self.timed_call})")
        noisy = "\nNOISY: machine busy - timings unreliable" if self.noise.get("noisy") else ""
        return head + "\n" + markdown_table(rows) + noisy + "".join(f"\nnote: {n}" for n in self.notes)


def describe_first_run(f: FirstRun) -> str:
    parts = []
    if f.atc_s is not None:
        parts.append(f"ATC {f.atc_s:.1f} s" + (" (cached)" if f.atc_cached else ""))
    if f.load_s is not None:
        parts.append(f"load {f.load_s:.2f} s")
    if f.first_call_ms is not None:
        parts.append(f"first call {f.first_call_ms:.0f} ms")
    return ", ".join(parts) or (f.note or "-")
