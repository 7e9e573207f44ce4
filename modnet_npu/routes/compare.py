"""The routes side by side, in three calls the pipeline makes at three moments.

1. :func:`plan_routes` at the start, before anything slow: is each route asked
   for installed at all (the CANN provider in ``onnxruntime``; ``atc`` on PATH
   and a way to name the chip)? A route that cannot run is one line, and the
   run stops.
2. :func:`open_routes` once the torch route has the device (so torch_npu sets
   the NPU up with its own options first) and before parity and the
   benchmark: the ORT-CANN session (refused if it fell back to the CPU), ATC
   (cached), the OM runtime, and each route's first call, timed.
3. :meth:`OpenRoutes.measure` after the pipeline's own benchmark: every route
   on every parity case against ONNX Runtime CPU's mattes, then one
   interleaved loop over ONNX Runtime CPU and every route.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from modnet_npu.routes.base import (GE_ONCE_NOTE, Route, RouteParity, RouteResult, RoutesReport,
                                    RouteUnavailableError, check_route_precision, parse_routes)

Log = Callable[[str], None]
OPEN_ORDER = ("ort-cann", "om", "torch")
TIMED_CALL = "host array in, host array out: copies to and from the device included, for every route"


@dataclass(frozen=True)
class RoutePlan:
    names: tuple[str, ...]  # the routes asked for, in the order asked
    precision: str  # "fp32" (kept) or "native" (each route's own default)
    soc_version: str | None
    device_id: int  # the NPU the ort-cann and om routes use
    atc: str | None

    @property
    def active(self) -> bool:
        """Whether anything beyond the pipeline's own torch run was asked for."""
        return any(n != "torch" for n in self.names)


def npu_index(device: str) -> int:
    """The NPU index of a ``--device`` value: ``npu:1`` -> 1; anything else -> 0."""
    kind, _, index = device.partition(":")
    return int(index) if kind == "npu" and index.isdigit() else 0


def plan_routes(names: Sequence[str] | str = ("torch",), *, precision: str = "fp32", soc_version: str | None = None,
                device: str = "auto") -> RoutePlan:
    """The cheap checks of every route asked for; RouteUnavailableError (one line) for the first that cannot run."""
    names = parse_routes(names) if isinstance(names, str) else parse_routes(",".join(names))
    check_route_precision(precision)
    atc = None
    if "ort-cann" in names:
        from modnet_npu.routes.ort_cann import check_installed

        check_installed()
    if "om" in names:
        from modnet_npu.routes.atc import find_atc, soc_sources_present

        atc = find_atc()
        if not soc_version and not soc_sources_present():
            raise RouteUnavailableError("om: cannot tell the chip for ATC's --soc_version (no torch_npu, no npu-smi "
                                        "on PATH); pass --soc-version, e.g. --soc-version Ascend910B3")
    return RoutePlan(names, precision, soc_version, npu_index(device), atc)


def _open_om(plan: RoutePlan, *, model_path: str, model_sha256: str, input_name: str,
             sizes: Sequence[tuple[int, int]], cache_dir: str, log: Log) -> Route:
    from modnet_npu.routes.atc import resolve_soc
    from modnet_npu.routes.om import OmRoute, compile_all, find_runtime

    soc, source = resolve_soc(plan.soc_version, plan.device_id)
    log(f"om: SoC {soc} (from {source})")
    compiled = compile_all(sizes, atc=plan.atc, model=model_path, model_sha256=model_sha256, input_name=input_name,
                           soc_version=soc, precision=plan.precision, cache_dir=cache_dir, log=log)
    runtime = find_runtime(compiled[sizes[0]].om_path)
    return OmRoute(compiled, runtime=runtime, device_id=plan.device_id, precision=plan.precision,
                   benchmark_size=sizes[0])


def _open(name: str, plan: RoutePlan, *, model_path: str, sizes: Sequence[tuple[int, int]], torch_engine: Any,
          threads: int, log: Log, **om: Any) -> Route:
    shape = (1, 3, *sizes[0])
    if name == "torch":
        from modnet_npu.routes.torch_route import TorchRoute

        return TorchRoute(torch_engine, shape=shape)
    if name == "ort-cann":
        from modnet_npu.routes.ort_cann import OrtCannRoute

        return OrtCannRoute(model_path, device_id=plan.device_id, precision=plan.precision, shape=shape,
                            threads=threads)
    return _open_om(plan, model_path=model_path, sizes=sizes, log=log, **om)


def open_routes(plan: RoutePlan, *, model_path: str, model_sha256: str, input_name: str,
                sizes: Sequence[tuple[int, int]], torch_engine: Any = None, cache_dir: str, threads: int = 1,
                log: Log = lambda m: None) -> "OpenRoutes | None":
    """Every route ready, its first call timed (``sizes``: the parity cases' sizes, the benchmark's first);
    None when only the pipeline's own torch run was asked for."""
    if not plan.active:
        return None
    sizes = list(dict.fromkeys(tuple(s) for s in sizes))
    opened: list[Route] = []
    try:
        # the quickest to refuse first (a fallen-back provider, then ATC and the OM runtime); torch's first call last
        for name in sorted(plan.names, key=OPEN_ORDER.index):
            route = _open(name, plan, model_path=model_path, sizes=sizes, torch_engine=torch_engine,
                          threads=threads, log=log, model_sha256=model_sha256, input_name=input_name,
                          cache_dir=cache_dir)
            opened.append(route)
            setup, first = route.setup(), route.first_run()
            log(f"route {name}: {setup.runtime}; precision {setup.precision} ({setup.precision_mode}); "
                f"first call {first.first_call_ms:.0f} ms")
    except BaseException:
        for route in opened:
            route.close()
        raise
    in_order = tuple(sorted(opened, key=lambda r: plan.names.index(r.name)))  # as asked, for the report
    return OpenRoutes(plan, in_order, sizes[0], getattr(torch_engine, "device", None))


@dataclass(frozen=True)
class OpenRoutes:
    plan: RoutePlan
    routes: tuple[Route, ...]
    size: tuple[int, int]
    torch_device: Any  # where the pipeline's torch engine runs (GE-once note)

    def close(self) -> None:
        for route in self.routes:
            route.close()

    def notes(self) -> tuple[str, ...]:
        notes = []
        if "ort-cann" in self.plan.names:  # the in-process GE route (the .om was compiled by ATC's own process)
            notes.append(GE_ONCE_NOTE)
        npu_first = getattr(self.torch_device, "type", None) == "npu"
        if npu_first and self.plan.precision == "native" and "ort-cann" in self.plan.names:
            notes.append("here torch_npu set the NPU up first, with ACL_PRECISION_MODE=must_keep_origin_dtype "
                         "(strict fp32 for parity): ort-cann's native (fp16) mode may not be in force in this run")
        return tuple(notes)

    def measure(self, results: Sequence[Any], *, ort: Any, torch_bounds: Any, mae_threshold: float | None = None,
                max_threshold: float, runs: int, warmup: int, threads: int, log: Log = lambda m: None
                ) -> RoutesReport:
        """Parity of every route on every case (``results``: the pipeline's CaseResults), then one interleaved loop
        of ONNX Runtime CPU and every route on the first case's input."""
        from modnet_npu.model.precision import MAE_THRESHOLDS
        from modnet_npu.proof.parity import Thresholds
        from modnet_npu.proof.report import latency_stats
        from modnet_npu.proof.timing import NoiseProbe, interleaved

        native = self.plan.precision == "native"
        asked = MAE_THRESHOLDS["fp32"] if mae_threshold is None else mae_threshold  # 0 is a bound, as in the pipeline
        bounds = Thresholds(MAE_THRESHOLDS["fp16"] if native else asked, max_threshold)
        parity = {r.name: route_parity(r, results, torch_bounds if r.name == "torch" else bounds)
                  for r in self.routes}
        for name, p in parity.items():
            log(f"route {name}: parity on {p.cases} case(s): worst MAE {p.mae:.3g}, max error {p.max_error:.3g} "
                f"-> {'PASS' if p.passed else 'FAIL'}")
        x = results[0].x
        contenders = {"ort-cpu": lambda: ort.run(x), **{r.name: (lambda r=r: r.call(x)) for r in self.routes}}
        with NoiseProbe(threads) as probe:
            times = interleaved(contenders, runs=runs, warmup=warmup)
        out = []
        for r in self.routes:
            extra = {}
            device_times = getattr(r, "device_times_ms", lambda n: None)(runs)
            if device_times:
                extra["device_exec_ms"] = asdict(latency_stats(device_times))  # the OM runtime's own clock
            out.append(RouteResult(r.name, r.setup(), parity[r.name], latency_stats(times[r.name]), r.first_run(),
                                   extra))
        report = RoutesReport(tuple(out), latency_stats(times["ort-cpu"]), self.size, runs, warmup, TIMED_CALL,
                              probe.result.to_dict(), self.notes(), times)
        log("routes median: " + ", ".join(f"{r.name} {r.latency.median_ms:.2f} ms" for r in out)
            + f" (ORT CPU {report.reference.median_ms:.2f} ms); {probe.result.describe()}")
        return report


def route_parity(route: Route, results: Sequence[Any], bounds: Any) -> RouteParity:
    """The route's matte against ONNX Runtime CPU's on every case; torch's are the pipeline's own comparisons."""
    from modnet_npu.proof.report import error_metrics

    scored = []
    for r in results:
        if route.name == "torch":
            floats = r.floats  # the pipeline compared exactly this engine on exactly these cases
        else:
            floats = error_metrics(r.ort_matte, route.infer(r.x)[0])
        scored.append((r, floats, floats.mae < bounds.mae and floats.max_error < bounds.max_error))
    worst = max(scored, key=lambda s: (not s[2], s[1].max_error))
    case = worst[0].case
    return RouteParity(cases=len(scored), cases_passing=sum(s[2] for s in scored),
                       worst_case=f"{os.path.basename(case.path)} @ {case.size[0]}x{case.size[1]}",
                       mae=worst[1].mae, max_error=worst[1].max_error,
                       mean_mae=float(sum(s[1].mae for s in scored) / len(scored)),
                       thresholds={"mae": bounds.mae, "max_error": bounds.max_error})
