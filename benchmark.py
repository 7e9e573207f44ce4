"""Benchmarks that compare, in one run and interleaved, what the tests cannot time.

Suites:

* ``batch`` — ``inference.py``'s image path (read, matte, write) over a folder of
  same-size images, ``--batch 1`` against ``--batch N``: per-image time and ratio.
* ``engines`` — ONNX Runtime (CPU), the faithful PyTorch model, the optimized
  one and the compiled one, at each ``--sizes`` x ``--batches``, on the real
  portrait: each one's median and its ratio to ONNX Runtime, and the operators
  each PyTorch form dispatches per forward.

Every suite alternates its contenders round by round, so the drift of a noisy
machine hits all of them alike, and reports medians and ratios; ``--json``
writes the figures to a file as well.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

from fileio import write_json

DEFAULT_IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "portrait_astronaut.jpg")


def _model_path(spec: str | None, models_dir: str, dynamic: bool = False) -> tuple[str, str]:
    """The model benchmarked: ``spec`` (offline), else a generated one; ``dynamic``
    asks for dynamic axes so ONNX Runtime can take other sizes and batches."""
    from model_source import resolve_model, synthetic_fallback

    if spec:
        src = resolve_model(spec, models_dir, offline=True)
        return src.path, src.source
    if not dynamic:
        return synthetic_fallback(models_dir).path, "synthetic"
    import synthetic_model

    path = os.path.join(models_dir, "synthetic", "modnet_official.onnx")
    if not os.path.exists(path):
        synthetic_model.generate(os.path.dirname(path), ["official"])
    return path, "synthetic (dynamic axes)"


def suite_batch(model: str, image: str, count: int, batch: int, rounds: int, size: int, threads: int,
                backend: str, log=print) -> dict:
    """Per-image time of inference.py's image path at batch 1 and at ``batch``."""
    from PIL import Image

    from jobs import plan_jobs, process_image_batch
    from matting import Matter

    matter = Matter(model, backend=backend, device="cpu", size=size, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in")
        os.makedirs(src)
        base = Image.open(image).convert("RGB")
        for i in range(count):  # same size, different content
            np_img = np.roll(np.asarray(base), 7 * i, axis=1)
            Image.fromarray(np_img).save(os.path.join(src, f"img{i:03d}.jpg"), quality=92)
        jobs = plan_jobs([src], os.path.join(tmp, "out"), ["matte"], "png", False).jobs
        times: dict[int, list[float]] = {1: [], batch: []}
        process_image_batch(matter, jobs[:batch], "white")  # warm-up
        for r in range(rounds):
            order = (1, batch) if r % 2 == 0 else (batch, 1)
            for b in order:
                start = time.perf_counter()
                for i in range(0, len(jobs), b):
                    process_image_batch(matter, jobs[i : i + b], "white")
                times[b].append((time.perf_counter() - start) * 1000 / len(jobs))
            log(f"  round {r + 1}/{rounds}: batch 1 {times[1][-1]:.1f} ms/img, batch {batch} {times[batch][-1]:.1f} ms/img")
    med1, medb = statistics.median(times[1]), statistics.median(times[batch])
    return {
        "suite": "batch",
        "backend": matter.engine.description,
        "images": count,
        "model_input": f"short side {size}",
        "per_image_ms": {"batch_1": times[1], f"batch_{batch}": times[batch]},
        "median_per_image_ms": {"batch_1": med1, f"batch_{batch}": medb},
        "speedup": med1 / medb,
    }


def suite_engines(model: str, image: str, sizes: Sequence[int], batches: Sequence[int], runs: int, warmup: int,
                  threads: int, device_spec: str, compile: bool, graphs: str, log=print) -> dict:
    """Interleaved medians of ONNX Runtime and the PyTorch forms; ratios to ONNX Runtime."""
    import torch

    import devices
    from convert_onnx_to_torch import convert
    from acceleration import compile_model, make_runner
    from timing import interleaved
    from engines import ort_session
    from imaging import load_image, normalize, resize_rgb
    from inference_form import optimize
    from modnet_arch import count_ops

    device = devices.select_device(device_spec)
    devices.prepare(device)
    session = ort_session(model, threads)
    in_name = session.get_inputs()[0].name
    batch_dim = session.get_inputs()[0].shape[0]
    faithful = convert(model).model
    optimized = optimize(faithful)
    rgb = load_image(image)
    results = []
    for size in sizes:
        x1 = normalize(resize_rgb(rgb, (size, size)))[None]
        ops = {name: dict(zip(("total", "kernels"), count_ops(m, torch.from_numpy(x1))[:2]))
               for name, m in (("faithful", faithful), ("optimized", optimized))}
        for batch in batches:
            x = np.repeat(x1, batch, axis=0)
            xt = torch.from_numpy(x).to(device)
            engines = {}
            if not isinstance(batch_dim, int) or batch_dim == batch:
                engines["ort_cpu"] = lambda: session.run(None, {in_name: x})
            else:
                log(f"  {size}x{size} batch {batch}: the ONNX file has a fixed batch {batch_dim}; ORT skipped")
            fa, op = faithful.to(device), optimized.to(device)
            engines["torch_faithful"] = lambda: fa(xt)
            engines["torch_optimized"] = lambda: op(xt)
            if device.type != "cpu" and graphs != "off":
                captured = make_runner(op, device, graphs="on")
                engines["torch_graphs"] = lambda: captured(xt)
            compile_s = None
            if compile:
                compiled = compile_model(op, device)
                start = time.perf_counter()
                with torch.inference_mode():
                    compiled(xt)
                devices.synchronize(device)
                compile_s = time.perf_counter() - start
                engines["torch_compiled"] = lambda: compiled(xt)
            with torch.inference_mode():
                times = interleaved(engines, runs=runs, warmup=warmup, sync=lambda: devices.synchronize(device))
            medians = {k: statistics.median(v) for k, v in times.items()}
            ref = medians.get("ort_cpu")
            row = {
                "size": size, "batch": batch, "runs": runs,
                "median_ms": medians,
                "ratio_to_ort": {k: v / ref for k, v in medians.items()} if ref else None,
                "per_image_ms": {k: v / batch for k, v in medians.items()},
                "compile_s": compile_s,
                "operators": ops,
                "times_ms": times,
            }
            results.append(row)
            log(f"  {size}x{size} batch {batch}: " + ", ".join(
                f"{k} {v:.1f} ms" + (f" (x{v / ref:.2f})" if ref else "") for k, v in medians.items()))
    return {"suite": "engines", "device": str(device), "device_name": devices.device_name(device),
            "model": model, "results": results}


def format_engines(result: dict) -> str:
    names = sorted({k for r in result["results"] for k in r["median_ms"]},
                   key=lambda k: ["ort_cpu", "torch_faithful", "torch_optimized", "torch_graphs", "torch_compiled"].index(k))
    head = "| size | batch | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for r in result["results"]:
        cells = []
        for n in names:
            v = r["median_ms"].get(n)
            ratio = r["ratio_to_ort"].get(n) if r["ratio_to_ort"] and v is not None else None
            cells.append("-" if v is None else f"{v:.1f} ms" + (f" (x{ratio:.2f})" if ratio is not None else ""))
        lines.append(f"| {r['size']} | {r['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("suite", choices=["batch", "engines"], help="what to measure")
    p.add_argument("--model", default=None, help="ONNX file (default: the generated model)")
    p.add_argument("--models-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
    p.add_argument("--image", default=DEFAULT_IMAGE, help="the picture benchmarked")
    p.add_argument("--count", type=int, default=16, help="batch suite: images in the folder")
    p.add_argument("--batch", type=int, default=8, help="batch suite: the batch compared with 1")
    p.add_argument("--size", type=int, default=512, help="batch suite: model input short side")
    p.add_argument("--backend", default="torch", help="batch suite: inference backend")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (timed runs per engine)")
    p.add_argument("--warmup", type=int, default=2, help="engines suite: untimed runs per engine")
    p.add_argument("--sizes", default="256,512", help="engines suite: square input sizes")
    p.add_argument("--batches", default="1,8", help="engines suite: batch sizes")
    p.add_argument("--device", default="cpu", help="engines suite: PyTorch device (auto|npu|cuda|mps|cpu)")
    p.add_argument("--no-compile", action="store_true", help="engines suite: leave out the compiled model")
    p.add_argument("--graphs", choices=("on", "off"), default="on", help="engines suite: graph capture on accelerators")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for every engine")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    from process_setup import setup_process

    setup_process(threads=args.threads, compile_cache_dir=os.path.join(args.models_dir, ".compile-cache"))
    try:
        return _run(args, argv)
    except (OSError, ValueError, RuntimeError) as exc:  # bad model, device or image: one line
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    model, source = _model_path(args.model, args.models_dir, dynamic=args.suite == "engines")
    print(f"{args.suite} benchmark on {platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"model {model} ({source})")
    if args.suite == "batch":
        result = suite_batch(model, args.image, args.count, args.batch, args.rounds, args.size, args.threads,
                             args.backend)
        med = result["median_per_image_ms"]
        print(f"median per image: batch 1 {med['batch_1']:.1f} ms, batch {args.batch} "
              f"{med[f'batch_{args.batch}']:.1f} ms; batch {args.batch} is x{result['speedup']:.2f} faster per image")
    else:
        ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
        result = suite_engines(model, args.image, ints(args.sizes), ints(args.batches), args.rounds, args.warmup,
                               args.threads, args.device, not args.no_compile, args.graphs)
        print(format_engines(result))
    result |= {"command": "python3 benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads}}
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
