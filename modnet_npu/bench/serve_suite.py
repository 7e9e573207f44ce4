"""The ``serve`` suite of ``benchmark.py``: the matting service under concurrent clients, batching on and off.

Two ``serve.py`` servers run side by side on free loopback ports, one batching
(``--batch-window-ms``, ``--max-batch``) and one not (``--max-batch 1
--batch-window-ms 0``); only one is driven at a time, alternating round by
round (``timing.rotated``), so a noisy machine's drift hits both alike. Each
client is a thread with its own keep-alive connection posting the portrait (a
cutout, PNG) again and again (:mod:`http_load`); the figures are requests per
second over the whole load, p50 and p99 of each request's wall time, and the
forward passes the server ran (``/api/info``), which shows how many requests
each batch served.

``python3 -m modnet_npu.bench.serve_suite`` runs it alone (the same options as ``benchmark.py serve``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
from modnet_npu import DEFAULT_IMAGE
from modnet_npu.bench import http_load
from modnet_npu.bench.http_load import Load
from modnet_npu.cli import Parser, run_command
from modnet_npu.errors import ModnetError, UsageError

CONFIGS = ("batching on", "batching off")
REQUEST_TIMEOUT_S = 300.0


def _forward_passes(url: str) -> int:
    return int(_info(url)["forward_passes"])


def drive(url: str, image: bytes, *, clients: int, per_client: int, deadline: float) -> Load:
    """``clients`` threads, ``per_client`` requests each to ``POST /api/matte``, all at once; stops early at
    ``deadline``; with the forward passes the server ran meanwhile (its ``/api/info``)."""
    before = _forward_passes(url)
    load = http_load.drive(http_load.Request(url + "/api/matte", image, "portrait.jpg", timeout_s=REQUEST_TIMEOUT_S),
                           clients=clients, per_client=per_client, deadline=deadline)
    return replace(load, forward_passes=_forward_passes(url) - before)


def _server_args(model: str, *, size: str, threads: int, backend: str, device: str, window_ms: float,
                 max_batch: int) -> dict[str, list[str]]:
    common = ["--model", model, "--backend", backend, "--device", device, "--size", size, "--threads", str(threads),
              "--log-level", "warning"]
    return {"batching on": [*common, "--batch-window-ms", f"{window_ms:g}", "--max-batch", str(max_batch)],
            "batching off": [*common, "--batch-window-ms", "0", "--max-batch", "1"]}


def suite_serve(model: str, image: str = DEFAULT_IMAGE, *, clients: Sequence[int] = (1, 4, 8),
                requests_per_client: int = 6, rounds: int = 2, size: str = "auto", threads: int = 0,
                backend: str = "torch", device: str = "cpu", window_ms: float = 5.0, max_batch: int = 8,
                time_limit_s: float = 3600.0, log: Callable[[str], None] = print) -> dict:
    """Requests/s and p50/p99 latency per client count, batching on and off (module docstring)."""
    from modnet_npu.proof.timing import rotated
    from modnet_npu.service.child import ServerProcess

    data = open(image, "rb").read()
    deadline = time.monotonic() + time_limit_s
    loads: dict[tuple[str, int], list[Load]] = {(c, n): [] for c in CONFIGS for n in clients}
    args = _server_args(model, size=size, threads=threads, backend=backend, device=device, window_ms=window_ms,
                        max_batch=max_batch)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(ServerProcess(args[name], log_path=os.path.join(tmp, f"{i}.log")))
                   for i, name in enumerate(CONFIGS)}
        for name, server in servers.items():  # first requests of each batch shape, off the clock
            drive(server.url, data, clients=max(clients), per_client=1, deadline=deadline)
            log(f"  {name}: ready at {server.url}")
        for r in range(rounds):
            for n in clients:
                for name in rotated(CONFIGS, r + clients.index(n)):
                    load = drive(servers[name].url, data, clients=n, per_client=requests_per_client, deadline=deadline)
                    loads[(name, n)].append(load)
                    log(f"  round {r + 1}/{rounds}, {n} client(s), {name}: {_rate(load):.2f} req/s, "
                        f"p50 {_pct(load.latencies_ms, 50):.0f} ms, {load.forward_passes} forwards for "
                        f"{len(load.latencies_ms)} requests, {load.errors} errors")
        info = _info(servers["batching on"].url)
    return {"suite": "serve", "image": os.path.basename(image), "model": os.path.basename(model),
            "engine": info.get("engine"), "model_size": info.get("model_size"),
            "settings": {"window_ms": window_ms, "max_batch": max_batch, "threads": threads,
                         "requests_per_client": requests_per_client, "rounds": rounds},
            "results": [_summary(name, n, loads[(name, n)]) for n in clients for name in CONFIGS]}


def _info(url: str) -> dict:
    import httpx

    return httpx.get(url + "/api/info", timeout=30).json()


def _rate(load: Load) -> float:
    return len(load.latencies_ms) / max(load.seconds, 1e-9)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _summary(config: str, clients: int, loads: list[Load]) -> dict:
    latencies = [ms for load in loads for ms in load.latencies_ms]
    requests = len(latencies)
    return {
        "config": config, "clients": clients, "requests": requests,
        "requests_per_s": requests / max(sum(load.seconds for load in loads), 1e-9),
        "requests_per_s_rounds": [_rate(load) for load in loads],
        "p50_ms": _pct(latencies, 50), "p99_ms": _pct(latencies, 99),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
        "forward_passes": sum(load.forward_passes for load in loads),
        "errors": sum(load.errors for load in loads),
    }


def format_serve(result: dict) -> str:
    """The two configurations side by side, one row per client count."""
    rows = {(r["config"], r["clients"]): r for r in result["results"]}
    counts = sorted({r["clients"] for r in result["results"]})
    head = ("| clients | batching on: req/s | p50 | p99 | requests per forward "
            "| batching off: req/s | p50 | p99 | throughput on/off |")
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in counts:
        on, off = rows[("batching on", n)], rows[("batching off", n)]
        per_forward = on["requests"] / max(on["forward_passes"], 1)
        lines.append(f"| {n} | {on['requests_per_s']:.2f} | {on['p50_ms']:.0f} ms | {on['p99_ms']:.0f} ms "
                     f"| {per_forward:.2f} | {off['requests_per_s']:.2f} | {off['p50_ms']:.0f} ms "
                     f"| {off['p99_ms']:.0f} ms | x{on['requests_per_s'] / max(off['requests_per_s'], 1e-9):.2f} |")
    errors = sum(r["errors"] for r in result["results"])
    lines.append(f"\n{result['engine']}, model input {result['model_size']}, {result['image']}; "
                 f"{errors} failed requests")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="ONNX file (default: the generated model)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="the picture posted")
    p.add_argument("--clients", default="1,4,8", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=6, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    p.add_argument("--size", default="auto", help="the servers' --size")
    p.add_argument("--threads", type=int, default=0, help="the servers' --threads (0: the free cores)")
    p.add_argument("--backend", default="torch", help="the servers' --backend")
    p.add_argument("--device", default="cpu", help="the servers' --device")
    p.add_argument("--window-ms", type=float, default=5.0, help="the batching server's --batch-window-ms")
    p.add_argument("--max-batch", type=int, default=8, help="the batching server's --max-batch")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


class ServeSuiteError(ModnetError, RuntimeError):
    """A server that would not start or answer: one line (its log's end is in the message)."""


def _main(args: argparse.Namespace) -> int:
    try:
        clients = [int(v) for v in args.clients.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--clients: comma-separated whole numbers, got {args.clients!r}") from None
    model = args.model
    if model is None:
        from modnet_npu.source.resolve import synthetic_fallback

        model = synthetic_fallback().path
    try:
        result = suite_serve(model, args.image, clients=clients, requests_per_client=args.requests,
                             rounds=args.rounds, size=args.size, threads=args.threads, backend=args.backend,
                             device=args.device, window_ms=args.window_ms, max_batch=args.max_batch)
    except (RuntimeError, TimeoutError) as exc:  # ServerProcess: a server that exited or never got ready
        raise ServeSuiteError(str(exc).splitlines()[0]) from None
    print(format_serve(result))
    if args.json:
        from modnet_npu.fileio import write_json

        write_json(args.json, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The suite alone; errors and exit statuses as every tool (``modnet_npu.cli``)."""
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
