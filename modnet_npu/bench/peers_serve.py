"""The peers suite's servers: ``rembg s`` against ``serve.py``, the same requests, on 127.0.0.1.

Every server runs at once (idle between its turns); only one is driven at a
time, the order rotating round by round (``timing.rotated``). Each client is a
thread with its own keep-alive connection (:mod:`http_load`) posting the photo
to ``POST /api/remove`` with ``model=<rembg model>`` (rembg's route;
``serve.py`` accepts and ignores ``model``); ``serve.py`` runs as the tests run
it (``service.child.ServerProcess``). Figures: requests per second per server
and client count, the median over rounds of each round's ratio to rembg, p50
latency, failed requests, and resident memory (after one request, after the
load, and the peak).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
from typing import Callable, Sequence

from modnet_npu.bench import http_load
from modnet_npu.bench import peers_rembg as pr
from modnet_npu.bench.http_load import Load, Request
from modnet_npu.proof.timing import rotated
from modnet_npu.service.child import ChildServer, ServerProcess

REQUEST_TIMEOUT_S = 600.0


def drive(url: str, image: bytes, fields: dict[str, str], *, clients: int, per_client: int) -> Load:
    """``clients`` threads posting ``per_client`` requests each to rembg's ``POST /api/remove``, all at once."""
    request = Request(url + "/api/remove", image, "photo.jpg", tuple(fields.items()), REQUEST_TIMEOUT_S)
    return http_load.drive(request, clients=clients, per_client=per_client)


def _servers(model: str, rembg: pr.Rembg | None, rembg_models: Sequence[str], backends: Sequence[str],
             threads: int, folder: str) -> dict[str, ChildServer]:
    servers: dict[str, ChildServer] = {}
    for m in (rembg_models if rembg else ()):
        port = pr.free_port()
        servers[f"rembg {m}"] = pr.Server([rembg.executable, "s", "--no-ui", "-h", "127.0.0.1", "-p", str(port),
                                           "-l", "warning"], port, "/openapi.json",
                                          os.path.join(folder, f"rembg_{m}.log"), env=rembg.env(threads))
    for b in backends:
        servers[f"ours {b}"] = ServerProcess(["--model", model, "--backend", b, "--threads", str(threads),
                                              "--log-level", "warning"], log_path=os.path.join(folder, f"ours_{b}.log"),
                                             env={"OMP_NUM_THREADS": str(threads)}, start_timeout=300.0)
    return servers


def _ratios(loads: dict[str, list[Load]], reference: str) -> dict[str, float]:
    """Per server, the median over rounds of its rate divided by the reference's in the same round."""
    out = {}
    for name, per_round in loads.items():
        if reference in loads and name != reference:
            pairs = zip(per_round, loads[reference])
            out[name] = float(statistics.median(a.rate / max(b.rate, 1e-9) for a, b in pairs))
    return out


def _summary(loads: dict[str, list[Load]], reference: str | None) -> dict:
    rows = {}
    for name, per_round in loads.items():
        lat = sorted(ms for load in per_round for ms in load.latencies_ms)
        rows[name] = {"requests_per_s": sum(ld.requests - ld.errors for ld in per_round)
                      / max(sum(ld.seconds for ld in per_round), 1e-9),
                      "requests_per_s_rounds": [ld.rate for ld in per_round],
                      "p50_ms": lat[len(lat) // 2] if lat else None,
                      "errors": sum(ld.errors for ld in per_round)}
    return {"servers": rows, "ratio_to_rembg": _ratios(loads, reference) if reference else {}}


def part_serve(model: str, image: str, rembg: pr.Rembg | None, rembg_models: Sequence[str],
               backends: Sequence[str], *, threads: int, clients: Sequence[int], per_client: int, rounds: int,
               log: Callable[[str], None]) -> dict:
    """Every server up at once, driven one at a time (module docstring)."""
    data = open(image, "rb").read()
    fields = {"model": rembg_models[0]} if rembg and rembg_models else {}
    reference = f"rembg {rembg_models[0]}" if rembg and rembg_models else None
    results: dict[str, dict] = {}
    memory: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = _servers(model, rembg, rembg_models, backends, threads, tmp)
        for name, server in servers.items():
            stack.enter_context(server)
            drive(server.url, data, fields, clients=1, per_client=1)  # its first request, off the clock
            memory[name] = {"after_one_request": server.memory()}
            log(f"  {name} ready at {server.url}, {memory[name]['after_one_request']['rss_mb']:.0f} MB")
        for n in clients:
            loads: dict[str, list[Load]] = {name: [] for name in servers}
            for r in range(rounds):
                for name in rotated(list(servers), r):
                    loads[name].append(drive(servers[name].url, data, fields, clients=n, per_client=per_client))
                    log(f"  serve {n} client(s) round {r + 1}/{rounds} {name}: {loads[name][-1].rate:.2f} req/s")
            results[str(n)] = _summary(loads, reference)
        for name, server in servers.items():
            memory[name]["after_load"] = server.memory()
    return {"clients": results, "memory_mb": memory, "request": {"route": "POST /api/remove", "fields": fields}}
