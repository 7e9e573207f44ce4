"""Benchmarks that compare, in one run and interleaved, what the tests cannot time.

Suites:

* ``batch`` — ``inference.py``'s image path (read, matte, write) over a folder of
  same-size images, ``--batch 1`` against ``--batch N``: per-image time and ratio.
* ``engines`` — ONNX Runtime (CPU), the faithful PyTorch model, the optimized
  one and the compiled one, at each ``--sizes`` x ``--batches``, on the real
  portrait: each one's median and its ratio to ONNX Runtime, and the operators
  each PyTorch form dispatches per forward.
* ``busy`` — the pipeline's batch-1 timing (ONNX Runtime against the optimized
  PyTorch model, the generated model's 256x256) on a quiet machine and beside a
  busy process, under each CPU set-up of ``--options`` (OpenMP's spin-waiting,
  thread count), each in a fresh process (OpenMP reads its settings once).
* ``serve`` — the matting service (``serve.py``) under 1, 4 and 8 concurrent clients,
  batching on and off side by side (``bench_serve.py``): requests/s, p50/p99 latency,
  requests per forward pass.
* ``ray`` — the local image path against ``inference.py --ray`` with 1 and 2 CPU
  actors (``bench_ray.py``): images/s, Ray's start-up and steady rate.

Every suite alternates its contenders round by round, so the drift of a noisy
machine hits all of them alike, reports medians and ratios, and says whether
the machine was busy meanwhile (``timing.NoiseProbe``); ``--json`` writes the
figures to a file as well, with paths relative to the repository.
"""
from __future__ import annotations

if __name__ == "__main__":  # as a command, not imported: bound OpenMP's spinning before torch loads
    from modnet_npu.runtime.process_setup import configure_openmp

    configure_openmp()

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from modnet_npu.cli import Parser, run_command
from modnet_npu.errors import ModnetError
from modnet_npu.fileio import write_json
from modnet_npu.proof.timing import NoiseProbe, rotated, usable_cpus
from modnet_npu.runtime.options import EngineOptions, compile_cache_dir, add_engine_arguments, engine_options_from
from modnet_npu.source.resolve import check_local

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IMAGE = os.path.join(ROOT, "assets", "portrait_astronaut.jpg")
# The engine options that apply to the suites (the model is --model below: a file, or the generated one),
# with the benchmarks' own defaults: PyTorch on the CPU.
BENCH_ENGINE = EngineOptions(backend="torch", device="cpu", models_dir=os.path.join(ROOT, "models"))
_NOT_ENGINE = ("model", "sha256", "offline", "allow_synthetic", "precision", "model_form", "size", "max_side",
               "compile", "graphs", "strict_fp32")


class BenchmarkError(ModnetError, RuntimeError):
    """A suite that could not run (a server or a probe process that failed, an engine error): one line."""


def repo_relative(path: str) -> str:
    """``path`` relative to the repository when inside it, else its file name (no absolute paths in results)."""
    full = os.path.abspath(path)
    if os.path.commonpath([full, ROOT]) == ROOT:
        return os.path.relpath(full, ROOT)
    return os.path.basename(full)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_path(spec: str | None, models_dir: str, dynamic: bool = False) -> tuple[str, str]:
    """The model benchmarked: ``spec`` (offline), else a generated one; ``dynamic``
    asks for dynamic axes so ONNX Runtime can take other sizes and batches."""
    from modnet_npu.source.resolve import resolve_model, synthetic_fallback

    if spec:
        src = resolve_model(spec, models_dir, offline=True)
        return src.path, src.source
    if not dynamic:
        return synthetic_fallback(models_dir).path, "synthetic"
    from modnet_npu.source import synthetic as synthetic_model

    path = os.path.join(models_dir, "synthetic", "modnet_official.onnx")
    if not os.path.exists(path):
        synthetic_model.generate(os.path.dirname(path), ["official"])
    return path, "synthetic (dynamic axes)"


def _noise_mark(noise: dict) -> str:
    return " [NOISY: machine busy, timings unreliable]" if noise.get("noisy") else ""


# --------------------------------------------------------------------------
# batch: inference.py's image path
# --------------------------------------------------------------------------


def _image_folder(image: str, folder: str, count: int) -> None:
    """``count`` same-size, different images (the portrait, shifted)."""
    from PIL import Image

    os.makedirs(folder)
    base = np.asarray(Image.open(image).convert("RGB"))
    for i in range(count):
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(os.path.join(folder, f"img{i:03d}.jpg"), quality=92)


def suite_batch(model: str, image: str, count: int, batch: int, rounds: int, size: int, threads: int,
                backend: str, log=print) -> dict:
    """Per-image time of inference.py's image path at batch 1 and at ``batch``."""
    from modnet_npu.matting.jobs import plan_jobs, process_image_batch
    from modnet_npu.matting.matter import Matter

    matter = Matter(model=model, backend=backend, device="cpu", size=size, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        _image_folder(image, os.path.join(tmp, "in"), count)
        jobs = plan_jobs([os.path.join(tmp, "in")], os.path.join(tmp, "out"), ["matte"], "png", False).jobs
        times: dict[int, list[float]] = {1: [], batch: []}
        process_image_batch(matter, jobs[:batch], "white")  # warm-up
        with NoiseProbe(threads) as probe:
            for r in range(rounds):
                for b in ((1, batch) if r % 2 == 0 else (batch, 1)):
                    start = time.perf_counter()
                    for i in range(0, len(jobs), b):
                        process_image_batch(matter, jobs[i : i + b], "white")
                    times[b].append((time.perf_counter() - start) * 1000 / len(jobs))
                log(f"  round {r + 1}/{rounds}: batch 1 {times[1][-1]:.1f} ms/img, "
                    f"batch {batch} {times[batch][-1]:.1f} ms/img")
    med1, medb = statistics.median(times[1]), statistics.median(times[batch])
    return {
        "suite": "batch",
        "backend": matter.engine.description,
        "images": count,
        "model_input": f"short side {size}",
        "per_image_ms": {"batch_1": times[1], f"batch_{batch}": times[batch]},
        "median_per_image_ms": {"batch_1": med1, f"batch_{batch}": medb},
        "speedup": med1 / medb,
        "noise": probe.result.to_dict(),
    }


# --------------------------------------------------------------------------
# engines: ONNX Runtime and the PyTorch forms
# --------------------------------------------------------------------------


def _contenders(session, in_name: str, batch_dim, models: dict, x: np.ndarray, device, graphs: str,
                compile: bool, log) -> tuple[dict[str, Callable[[], object]], float | None]:
    """What is timed at one size and batch (each callable bound to its own input), and the compile time."""
    import torch

    from modnet_npu.runtime import devices
    from modnet_npu.runtime.acceleration import compile_model, make_runner

    batch = x.shape[0]
    xt = torch.from_numpy(x).to(device)
    engines: dict[str, Callable[[], object]] = {}
    if not isinstance(batch_dim, int) or batch_dim == batch:
        engines["ort_cpu"] = lambda: session.run(None, {in_name: x})
    else:
        log(f"  batch {batch}: the ONNX file has a fixed batch {batch_dim}; ORT skipped")
    fa, op = models["faithful"], models["optimized"]  # already on the device (suite_engines: on_device)
    engines["torch_faithful"] = lambda: fa(xt)
    engines["torch_optimized"] = lambda: op(xt)
    captured = None
    if device.type != "cpu" and graphs != "off":
        # auto: a failed capture runs eagerly and is counted, so the row can be dropped honestly
        captured = make_runner(op, device, graphs="auto", log=log)
        captured.prepare(xt)  # captured now: the timed calls replay
        engines["torch_graphs"] = lambda: captured(xt)
    compile_s = None
    if compile:
        compiled = compile_model(op, device)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled.prepare(xt)  # compiled (or loaded) and run once, before the timing
        devices.synchronize(device)
        compile_s = time.perf_counter() - start
        engines["torch_compiled"] = lambda: compiled(xt)
    return engines, compile_s, captured


def on_device(models: dict, device) -> dict:
    """Each model on ``device``: itself where it is there already, else a copy moved there.

    ``Module.to`` moves a model in place: moving the caller's models would leave
    them on the device, and the next size's operator count (a CPU input) failed.
    """
    import copy

    def there(m) -> bool:
        return all(t.device == device for t in (*m.parameters(), *m.buffers()))

    return {name: m if there(m) else copy.deepcopy(m).to(device) for name, m in models.items()}


def _drop_uncaptured(times: dict, captured, where: str, log) -> str | None:
    """Remove the graph row when nothing was captured (it timed eager code); the note says why."""
    if captured is None or captured.stats().captures:
        return None
    s = captured.stats()
    times.pop("torch_graphs", None)
    why = s.capture_blocked or "; ".join(sorted(set(s.capture_failures.values()))) or "no shape was seen twice"
    log(f"  {where}: graph row dropped, nothing was captured ({why})")
    return f"graph row dropped: nothing was captured ({why})"


def _engines_row(size: int, batch: int, runs: int, times: dict, compile_s, ops: dict, noise: dict) -> dict:
    medians = {k: statistics.median(v) for k, v in times.items()}
    ref = medians.get("ort_cpu")
    return {
        "size": size, "batch": batch, "runs": runs,
        "median_ms": medians,
        "ratio_to_ort": {k: v / ref for k, v in medians.items()} if ref else None,
        "per_image_ms": {k: v / batch for k, v in medians.items()},
        "compile_s": compile_s,
        "operators": ops,
        "times_ms": times,
        "noise": noise,
    }


def suite_engines(model: str, image: str, sizes: Sequence[int], batches: Sequence[int], runs: int, warmup: int,
                  threads: int, device_spec: str, compile: bool, graphs: str, log=print) -> dict:
    """Interleaved medians of ONNX Runtime and the PyTorch forms; ratios to ONNX Runtime."""
    import torch

    from modnet_npu.runtime import devices
    from modnet_npu.conversion.convert import convert
    from modnet_npu.runtime.engines import ort_session
    from modnet_npu.matting.imaging import load_image, normalize, resize_rgb
    from modnet_npu.model.optimized import optimize
    from modnet_npu.graph.analysis import count_ops
    from modnet_npu.proof.timing import interleaved

    device = devices.select_device(device_spec)
    devices.activate(device, strict_fp32=True)
    faithful = convert(model).model  # first: checks the file (external data too) before ONNX Runtime reads it
    session = ort_session(model, threads)
    in_name, batch_dim = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    models = {"faithful": faithful, "optimized": optimize(faithful)}  # stay on the CPU: operators counted there
    placed = on_device(models, device)
    rgb = load_image(image)
    results = []
    for size in sizes:
        x1 = normalize(resize_rgb(rgb, (size, size)))[None]
        ops = {name: dict(zip(("total", "kernels"), count_ops(m, torch.from_numpy(x1))[:2], strict=True))
               for name, m in models.items()}
        for batch in batches:
            engines, compile_s, captured = _contenders(session, in_name, batch_dim, placed,
                                                       np.repeat(x1, batch, axis=0), device, graphs, compile, log)
            with torch.inference_mode(), NoiseProbe(threads) as probe:
                times = interleaved(engines, runs=runs, warmup=warmup, sync=lambda: devices.synchronize(device))
            note = _drop_uncaptured(times, captured, f"{size}x{size} batch {batch}", log)
            row = _engines_row(size, batch, runs, times, compile_s, ops, probe.result.to_dict()) | {"note": note}
            results.append(row)
            ref = row["median_ms"].get("ort_cpu")
            log(f"  {size}x{size} batch {batch}: " + ", ".join(
                f"{k} {v:.1f} ms" + (f" (x{v / ref:.2f})" if ref else "") for k, v in row["median_ms"].items())
                + _noise_mark(row["noise"]))
    return {"suite": "engines", "device": str(device), "device_name": devices.device_name(device),
            "model": repo_relative(model), "model_sha256": _sha256(model), "results": results}


ENGINE_ORDER = ["ort_cpu", "torch_faithful", "torch_optimized", "torch_graphs", "torch_compiled"]


def format_engines(result: dict) -> str:
    names = sorted({k for r in result["results"] for k in r["median_ms"]}, key=ENGINE_ORDER.index)
    head = "| size | batch | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for r in result["results"]:
        cells = []
        for n in names:
            v = r["median_ms"].get(n)
            ratio = r["ratio_to_ort"].get(n) if r["ratio_to_ort"] and v is not None else None
            cells.append("-" if v is None else f"{v:.1f} ms" + (f" (x{ratio:.2f})" if ratio is not None else ""))
        lines.append(f"| {r['size']} | {r['batch']} | " + " | ".join(cells) + " |" + _noise_mark(r.get("noise", {})))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# busy: the CPU set-up on a quiet and on a busy machine
# --------------------------------------------------------------------------

# name -> (environment for OpenMP, threads: 0 = automatic (the CPUs free), -1 = every CPU)
BUSY_OPTIONS: dict[str, tuple[dict[str, str], int]] = {
    "default": ({"GOMP_SPINCOUNT": "300000"}, -1),  # libgomp's own default spin count
    "spin-30000": ({"GOMP_SPINCOUNT": "30000"}, -1),
    "spin-10000": ({"GOMP_SPINCOUNT": "10000"}, -1),
    "spin-3000": ({"GOMP_SPINCOUNT": "3000"}, -1),
    "spin-1000": ({"GOMP_SPINCOUNT": "1000"}, -1),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, -1),
    "free-cpus": ({"GOMP_SPINCOUNT": "300000"}, 0),
    "free-cpus+spin-10000": ({"GOMP_SPINCOUNT": "10000"}, 0),
    "free-cpus+spin-3000": ({"GOMP_SPINCOUNT": "3000"}, 0),
    "free-cpus+spin-1000": ({"GOMP_SPINCOUNT": "1000"}, 0),
    "1-thread": ({"GOMP_SPINCOUNT": "300000"}, 1),
}


def probe_pipeline_timing(model: str, image: str, runs: int, warmup: int, threads: int) -> dict:
    """The pipeline's batch-1 timing in this process: ONNX Runtime and the optimized PyTorch model, interleaved."""
    import torch

    from modnet_npu.conversion.convert import convert
    from modnet_npu.runtime.engines import OrtEngine
    from modnet_npu.runtime.torch_engine import TorchEngine
    from modnet_npu.matting.imaging import load_image, normalize, resize_rgb
    from modnet_npu.model.optimized import optimize
    from modnet_npu.proof.timing import interleaved

    ort = OrtEngine(model, threads=threads, validate=False)
    size = ort.fixed_size or (256, 256)
    engine = TorchEngine(optimize(convert(model).model), torch.device("cpu"), threads=threads)
    x = normalize(resize_rgb(load_image(image), size))[None]
    xt = engine.to_device(x)
    with NoiseProbe(threads) as probe:
        times = interleaved({"ort": lambda: ort.run(x), "torch": lambda: engine.runner(xt)}, runs=runs,
                            warmup=warmup, rotate=False)
    engine.close()
    return {"threads": threads, "torch_threads": torch.get_num_threads(), "size": list(size),
            "ort_ms": times["ort"], "torch_ms": times["torch"], "noise": probe.result.to_dict()}


# one core's worth of work, which ends by itself when its parent goes (even killed)
BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(1_000_000): pass"


@contextlib.contextmanager
def busy_process(busy: bool) -> Iterator[None]:
    """A CPU-bound process beside the block when ``busy`` (one core's worth), killed after."""
    if not busy:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # running before the measured process starts
        yield
    finally:
        proc.kill()
        proc.wait()


def _probe_in_child(option: str, model: str, image: str, runs: int, warmup: int) -> dict:
    env_extra, threads = BUSY_OPTIONS[option]
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | env_extra
    threads = usable_cpus() if threads < 0 else threads
    cmd = [sys.executable, os.path.join(ROOT, "benchmark.py"), "probe", "--model", model, "--image", image,
           "--rounds", str(runs), "--warmup", str(warmup), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"probe {option} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_until_quiet(max_wait_s: float, log=print) -> float | None:
    """On a shared machine: wait (up to ``max_wait_s``) until other processes leave nearly all CPUs idle
    (2-second samples); returns the idle CPUs last seen (None where unmeasurable)."""
    from modnet_npu.proof.timing import idle_cpus

    deadline = time.monotonic() + max_wait_s
    idle = idle_cpus(2.0)
    while idle is not None and idle < usable_cpus() - 0.2 and time.monotonic() < deadline:
        idle = idle_cpus(2.0)
    if idle is not None and idle < usable_cpus() - 0.2:
        log(f"  still busy after {max_wait_s:.0f} s ({idle:.1f} CPUs idle): measuring anyway")
    return idle


def _busy_block(options: Sequence[str], busy: bool, r: int, model: str, image: str, runs: int, warmup: int,
                idle: float | None, log) -> list[dict]:
    """Every option once, in its own process, with or without the busy process beside it."""
    out = []
    with busy_process(busy):
        for option in options:
            res = _probe_in_child(option, model, image, runs, warmup)
            res |= {"option": option, "busy": busy, "round": r, "idle_cpus_before": idle,
                    "ort_median_ms": statistics.median(res["ort_ms"]),
                    "torch_median_ms": statistics.median(res["torch_ms"])}
            out.append(res)
            log(f"  round {r + 1} {'busy ' if busy else 'quiet'} {option}: {res['threads']} thread(s), "
                f"ORT {res['ort_median_ms']:.0f} ms, PyTorch {res['torch_median_ms']:.0f} ms"
                f" (others used {res['noise']['other_cpu_load']} CPUs)")
    return out


def suite_busy(model: str, image: str, options: Sequence[str], rounds: int, runs: int, warmup: int,
               loads: Sequence[str] = ("quiet", "busy"), wait_quiet_s: float = 0.0, log=print) -> dict:
    """Each option's pipeline timing, quiet and beside a busy process (``loads``), ``rounds`` times, in
    rotating order; ``wait_quiet_s``: before each block, wait up to that long for the machine's other work
    to stop (a shared machine's "quiet" is otherwise not quiet)."""
    unknown = [o for o in options if o not in BUSY_OPTIONS] + [x for x in loads if x not in ("quiet", "busy")]
    if unknown or not loads:
        raise ValueError(f"unknown busy option(s) or loads {', '.join(unknown)}; choose from "
                         f"{', '.join(BUSY_OPTIONS)}; loads quiet, busy")
    runs_out: list[dict] = []
    flags = [x == "busy" for x in loads]
    for r in range(rounds):
        order = rotated(options, r)
        for busy in (flags if r % 2 == 0 else flags[::-1]):
            idle = wait_until_quiet(wait_quiet_s, log) if wait_quiet_s > 0 else None
            runs_out += _busy_block(order, busy, r, model, image, runs, warmup, idle, log)
    return {"suite": "busy", "model": repo_relative(model), "model_sha256": _sha256(model),
            "options": {o: {"env": BUSY_OPTIONS[o][0], "threads": BUSY_OPTIONS[o][1]} for o in options},
            "summary": _busy_summary(runs_out, options, loads), "runs": runs_out}


def _clean(runs: list[dict], busy: bool) -> list[dict]:
    """The runs a summary trusts: quiet ones that other work did not disturb (NoiseProbe: not noisy);
    busy ones where the others' CPU use was our busy process's alone (0.6 to 1.3 CPUs: a spinning
    PyTorch takes some from it). All of them when none qualifies."""
    ok = [r for r in runs if (0.6 <= (r["noise"]["other_cpu_load"] or 0) <= 1.3 if busy else not r["noise"]["noisy"])]
    return ok or runs


def _busy_summary(runs: list[dict], options: Sequence[str], loads: Sequence[str]) -> dict:
    """Per option and load: the median over rounds of each process's medians (trusted runs, see
    :func:`_clean`), and PyTorch / ORT."""
    out: dict[str, dict] = {}
    for option in options:
        out[option] = {}
        for load in loads:
            every = [r for r in runs if r["option"] == option and r["busy"] == (load == "busy")]
            mine = _clean(every, load == "busy")
            ort = statistics.median(r["ort_median_ms"] for r in mine)
            torch_ms = statistics.median(r["torch_median_ms"] for r in mine)
            out[option][load] = {"ort_median_ms": round(ort, 1), "torch_median_ms": round(torch_ms, 1),
                                 "torch_over_ort": round(torch_ms / ort, 2),
                                 "torch_range_ms": [round(min(r["torch_median_ms"] for r in mine), 1),
                                                    round(max(r["torch_median_ms"] for r in mine), 1)],
                                 "threads": sorted({r["threads"] for r in mine}),
                                 "runs_used": len(mine), "runs_left_out": len(every) - len(mine)}
    return out


def format_busy(result: dict) -> str:
    loads = list(next(iter(result["summary"].values())))
    head = "| option | " + " | ".join(f"{x} ORT | {x} PyTorch | {x} PyTorch/ORT | {x} threads" for x in loads) + " |"
    lines = [head, "|---|" + "---|---|---|---|" * len(loads)]
    for option, s in result["summary"].items():
        cells = [f"{s[x]['ort_median_ms']:.0f} ms | {s[x]['torch_median_ms']:.0f} ms "
                 f"({s[x]['torch_range_ms'][0]:.0f}-{s[x]['torch_range_ms'][1]:.0f}) | x{s[x]['torch_over_ort']:.2f} | "
                 f"{s[x]['threads']}" + (f" ({s[x]['runs_left_out']} disturbed runs left out)"
                                         if s[x]["runs_left_out"] else "")
                 for x in loads]
        lines.append(f"| {option} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite", choices=["batch", "engines", "busy", "serve", "ray", "peers", "precision", "probe"],
                   help="what to measure (probe: one process of the busy suite; peers: rembg and OpenVINO beside "
                        "ours; precision: the real-weight quality figures; these two have options of their own: "
                        "benchmark.py peers --help)")
    p.add_argument("--model", default=None, help="ONNX file (default: the generated model)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="the picture benchmarked")
    p.add_argument("--count", type=int, default=16, help="batch and ray suites: images in the folder")
    p.add_argument("--batch", type=int, default=8, help="batch suite: the batch compared with 1")
    p.add_argument("--size", type=int, default=512, help="batch, serve and ray suites: model input short side")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (timed runs per engine)")
    p.add_argument("--warmup", type=int, default=2, help="engines and busy suites: untimed runs per engine")
    p.add_argument("--sizes", default="256,512", help="engines suite: square input sizes")
    p.add_argument("--batches", default="1,8", help="engines suite: batch sizes")
    p.add_argument("--no-compile", action="store_true", help="engines suite: leave out the compiled model")
    p.add_argument("--graphs", choices=("on", "off"), default="on", help="engines suite: graph capture on accelerators")
    p.add_argument("--options", default=",".join(BUSY_OPTIONS), help="busy suite: CPU set-ups compared")
    p.add_argument("--busy-rounds", type=int, default=3, help="busy suite: quiet/busy rounds over all options")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="busy suite: before each block wait up to this many seconds for other work to stop")
    p.add_argument("--loads", default="quiet,busy", help="busy suite: quiet (nothing added), busy (a CPU-bound "
                   "process beside)")
    p.add_argument("--clients", default="1,4,8", help="serve suite: concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=4, help="serve suite: requests per client per round")
    p.add_argument("--window-ms", type=float, default=5.0, help="serve suite: the batching server's --batch-window-ms")
    p.add_argument("--json", default=None, help="also write the results here")
    add_engine_arguments(p, omit=_NOT_ENGINE, defaults=BENCH_ENGINE, help={
        "backend": "batch, serve and ray suites: inference backend",
        "device": "engines and serve suites: PyTorch device (auto|npu|npu:N|cuda|cuda:N|mps|cpu)",
        "threads": "CPU threads for every engine (0 = automatic: the CPUs other processes leave free at the "
                   "start; more than this process may use is clamped)",
    })
    return p


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    engine_options_from(args, base=BENCH_ENGINE)  # every engine option checked before anything runs
    if args.model:
        check_local(args.model)  # a missing local model file: one line before torch loads
    from modnet_npu.runtime.process_setup import setup_process

    # before any torch import here: bounds OpenMP's spin-waiting (a no-op when torch is already loaded)
    settings = setup_process(threads=args.threads, compile_cache_dir=compile_cache_dir(args.models_dir))
    args.threads = settings.threads
    try:
        return _run(args, argv)
    except RuntimeError as exc:  # a server or probe that failed, an engine's own error: one line, not a traceback
        if isinstance(exc, ModnetError):
            raise
        raise BenchmarkError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the suite, print; every failure one ``error:`` line and the shared exit status (``modnet_npu.cli``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["peers"]:  # rembg, OpenVINO and servers side by side: options of its own (peers_suite)
        from modnet_npu.bench.peers_suite import main as peers_main

        return peers_main(args[1:])
    if args[:1] == ["precision"]:  # half precision, demos, layer by layer on the real model (precision_suite)
        from modnet_npu.bench.precision_suite import main as precision_main

        return precision_main(args[1:])
    return run_command(build_parser(), lambda args: _main(args, argv), argv)


def _suite(args: argparse.Namespace, model: str) -> tuple[dict, str]:
    """Run the chosen suite; its result and its printed summary."""
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    if args.suite == "batch":
        result = suite_batch(model, args.image, args.count, args.batch, args.rounds, args.size, args.threads,
                             args.backend)
        med = result["median_per_image_ms"]
        return result, (f"median per image: batch 1 {med['batch_1']:.1f} ms, batch {args.batch} "
                        f"{med[f'batch_{args.batch}']:.1f} ms; batch {args.batch} is x{result['speedup']:.2f} "
                        "faster per image" + _noise_mark(result["noise"]))
    if args.suite == "engines":
        result = suite_engines(model, args.image, ints(args.sizes), ints(args.batches), args.rounds, args.warmup,
                               args.threads, args.device, not args.no_compile, args.graphs)
        return result, format_engines(result)
    if args.suite == "serve":
        from modnet_npu.bench.serve_suite import format_serve, suite_serve

        result = suite_serve(model, args.image, clients=ints(args.clients), requests_per_client=args.requests,
                             rounds=args.rounds, size=str(args.size), threads=args.threads, backend=args.backend,
                             device=args.device, window_ms=args.window_ms)
        return result, format_serve(result)
    if args.suite == "ray":
        from modnet_npu.bench.ray_suite import format_ray, suite_ray

        # threads stay 0: the actors split the cores among themselves
        result = suite_ray(model, args.image, count=args.count, size=args.size, backend=args.backend,
                           rounds=args.rounds)
        return result, format_ray(result)
    names = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
    result = suite_busy(model, args.image, names(args.options), args.busy_rounds, args.rounds, args.warmup,
                        names(args.loads), args.wait_quiet)
    return result, format_busy(result)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    model, source = _model_path(args.model, args.models_dir, dynamic=args.suite in ("engines", "ray"))
    if args.suite == "probe":  # one process of the busy suite: its figures as one JSON line
        print(json.dumps(probe_pipeline_timing(model, args.image, args.rounds, args.warmup, args.threads)))
        return 0
    print(f"{args.suite} benchmark on {platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"model {repo_relative(model)} ({source})")
    result, text = _suite(args, model)
    print(text)
    cmd_args = [repo_relative(a) if os.path.isabs(a) else a for a in (argv if argv is not None else sys.argv[1:])]
    result |= {"command": "python3 benchmark.py " + " ".join(cmd_args),
               "machine": {"cpu": platform.processor() or platform.machine(), "cpus": usable_cpus(),
                           "threads": args.threads}}
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
