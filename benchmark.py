"""Benchmarks that compare, in one run and interleaved, what the tests cannot time.

Suites:

* ``batch`` — ``inference.py``'s image path (read, matte, write) over a folder of
  same-size images, ``--batch 1`` against ``--batch N``: per-image time and ratio.

Every suite alternates its contenders round by round, so the drift of a noisy
machine hits all of them alike, and reports medians and ratios; ``--json``
writes the figures to a file as well.
"""
from __future__ import annotations

import argparse
import json
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


def _model_path(spec: str | None, models_dir: str) -> tuple[str, str]:
    from model_source import ModelSourceError, resolve_model, synthetic_fallback

    try:
        src = resolve_model(spec, models_dir, offline=True) if spec else synthetic_fallback(models_dir)
    except ModelSourceError:
        src = synthetic_fallback(models_dir)
    return src.path, src.source


def suite_batch(model: str, image: str, count: int, batch: int, rounds: int, size: int, threads: int,
                backend: str, log=print) -> dict:
    """Per-image time of inference.py's image path at batch 1 and at ``batch``."""
    import torch
    from PIL import Image

    import inference

    torch.set_num_threads(threads)
    matter = inference.Matter(model, backend=backend, device="cpu", size=size, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in")
        os.makedirs(src)
        base = Image.open(image).convert("RGB")
        for i in range(count):  # same size, different content
            np_img = np.roll(np.asarray(base), 7 * i, axis=1)
            Image.fromarray(np_img).save(os.path.join(src, f"img{i:03d}.jpg"), quality=92)
        jobs, _ = inference.plan_jobs([src], os.path.join(tmp, "out"), ["matte"], "png", False)
        times: dict[int, list[float]] = {1: [], batch: []}
        inference.process_image_batch(matter, jobs[:batch], "white")  # warm-up
        for r in range(rounds):
            order = (1, batch) if r % 2 == 0 else (batch, 1)
            for b in order:
                start = time.perf_counter()
                for i in range(0, len(jobs), b):
                    inference.process_image_batch(matter, jobs[i : i + b], "white")
                times[b].append((time.perf_counter() - start) * 1000 / len(jobs))
            log(f"  round {r + 1}/{rounds}: batch 1 {times[1][-1]:.1f} ms/img, batch {batch} {times[batch][-1]:.1f} ms/img")
    med1, medb = statistics.median(times[1]), statistics.median(times[batch])
    return {
        "suite": "batch",
        "backend": matter.backend.description,
        "images": count,
        "model_input": f"short side {size}",
        "per_image_ms": {"batch_1": times[1], f"batch_{batch}": times[batch]},
        "median_per_image_ms": {"batch_1": med1, f"batch_{batch}": medb},
        "speedup": med1 / medb,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("suite", choices=["batch"], help="what to measure")
    p.add_argument("--model", default=None, help="ONNX file (default: the generated model)")
    p.add_argument("--models-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
    p.add_argument("--image", default=DEFAULT_IMAGE, help="the picture benchmarked")
    p.add_argument("--count", type=int, default=16, help="batch suite: images in the folder")
    p.add_argument("--batch", type=int, default=8, help="batch suite: the batch compared with 1")
    p.add_argument("--size", type=int, default=512, help="batch suite: model input short side")
    p.add_argument("--backend", default="torch", help="batch suite: inference backend")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for every engine")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    model, source = _model_path(args.model, args.models_dir)
    print(f"{args.suite} benchmark on {platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"model {model} ({source})")
    result = suite_batch(model, args.image, args.count, args.batch, args.rounds, args.size, args.threads, args.backend)
    med = result["median_per_image_ms"]
    print(f"median per image: batch 1 {med['batch_1']:.1f} ms, batch {args.batch} {med[f'batch_{args.batch}']:.1f} ms; "
          f"batch {args.batch} is x{result['speedup']:.2f} faster per image")
    result |= {"command": "python3 benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads}}
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
