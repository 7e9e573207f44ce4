"""The benchmark entry points run end to end (tiny sizes: this checks the plumbing, not speed)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import benchmark


def test_engines_suite_smoke(tmp_path, flavour_files, capsys):
    out = tmp_path / "engines.json"
    code = benchmark.main(["engines", "--model", flavour_files["official"], "--sizes", "64", "--batches", "1,2",
                           "--rounds", "2", "--warmup", "0", "--no-compile", "--threads", "999",
                           "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [(r["size"], r["batch"]) for r in rows] == [(64, 1), (64, 2)]
    for r in rows:
        assert set(r["median_ms"]) == {"ort_cpu", "torch_faithful", "torch_optimized"}
        assert r["ratio_to_ort"]["ort_cpu"] == 1.0 and len(r["times_ms"]["ort_cpu"]) == 2
        assert {"load_average", "cpu_time_ratio", "noisy"} <= set(r["noise"])
    assert "| 64 | 2 |" in capsys.readouterr().out
    assert data["machine"]["threads"] == data["machine"]["cpus"]  # 999 asked, the CPUs there recorded
    assert not os.path.isabs(data["model"]) and len(data["model_sha256"]) == 64


def test_batch_suite_smoke(tmp_path, webnn_file):
    out = tmp_path / "batch.json"
    assert benchmark.main(["batch", "--model", webnn_file, "--count", "2", "--batch", "2", "--size", "64",
                           "--rounds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["speedup"] > 0 and len(data["per_image_ms"]["batch_2"]) == 1
    assert isinstance(data["noise"]["noisy"], bool)


def test_busy_suite_smoke(tmp_path, webnn_file, capsys):
    """One option, quiet then busy, each in its own process with its own OpenMP settings."""
    out = tmp_path / "busy.json"
    assert benchmark.main(["busy", "--model", webnn_file, "--options", "spin-1000", "--busy-rounds", "1",
                           "--rounds", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["option"], r["busy"]) for r in data["runs"]] == [("spin-1000", False), ("spin-1000", True)]
    summary = data["summary"]["spin-1000"]
    assert summary["busy"]["torch_over_ort"] > 0 and summary["quiet"]["threads"] == [data["machine"]["cpus"]]
    assert data["runs"][1]["noise"]["other_cpu_load"] > 0.5  # the busy process was there, and measured
    assert "| spin-1000 |" in capsys.readouterr().out


def test_repo_relative_paths():
    assert benchmark.repo_relative(os.path.join(benchmark.ROOT, "models", "m.onnx")) == os.path.join("models",
                                                                                                      "m.onnx")
    assert benchmark.repo_relative("/elsewhere/m.onnx") == "m.onnx"


def test_graph_row_is_dropped_when_nothing_was_captured():
    from modnet_npu.runtime.acceleration import FastPathStats

    class Runner:
        def __init__(self, captures, failures):
            self.s = FastPathStats(pieces=("graph capture",), describe="graph capture", captures=captures, replays=0,
                                   capture_failures=failures, capture_blocked=None, compiled_now=0,
                                   compiled_from_cache=0)

        def stats(self):
            return self.s

    times = {"torch_optimized": [1.0], "torch_graphs": [1.0]}
    note = benchmark._drop_uncaptured(times, Runner(0, {"(1, 3, 256, 256) float32": "aclop"}), "256x256", print)
    assert "torch_graphs" not in times and "aclop" in note
    kept = {"torch_graphs": [1.0]}
    assert benchmark._drop_uncaptured(kept, Runner(1, {}), "256x256", print) is None and "torch_graphs" in kept


def test_engines_suite_on_a_device_runs_every_size_and_leaves_the_models_where_they_were(monkeypatch, tmp_path,
                                                                                          flavour_files):
    """``meta`` stands in for cuda/npu (a device that is not the CPU, where forwards still run): the suite used
    to move the models in place and then count operators with a CPU input, failing at its second size."""
    import torch

    from modnet_npu.conversion.convert import convert
    from modnet_npu.model.optimized import optimize
    from modnet_npu.runtime import devices

    meta = torch.device("meta")
    monkeypatch.setattr(devices, "select_device", lambda spec: meta)
    result = benchmark.suite_engines(flavour_files["official"], benchmark.DEFAULT_IMAGE, [32, 64], [1, 2], runs=1,
                                     warmup=0, threads=1, device_spec="cuda", compile=False, graphs="off",
                                     log=lambda m: None)
    assert [(r["size"], r["batch"]) for r in result["results"]] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    assert result["device"] == "meta"
    faithful = convert(flavour_files["official"]).model
    models = {"faithful": faithful, "optimized": optimize(faithful)}
    placed = benchmark.on_device(models, meta)
    benchmark._contenders(None, "input", "batch", placed, np.zeros((1, 3, 32, 32), np.float32), meta, "off", False,
                          lambda m: None)
    for name, model in models.items():
        assert {t.device.type for t in model.parameters()} == {"cpu"}, name  # the caller's models stay put
        assert {t.device.type for t in placed[name].parameters()} == {"meta"}
    assert benchmark.on_device(placed, meta)["optimized"] is placed["optimized"]  # no copy where already there


def test_the_http_load_driver_counts_failures_and_keeps_its_deadline():
    import http.server
    import threading
    import time

    from modnet_npu.bench import http_load

    seen: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the clients use it

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(body)
            status = 500 if len(seen) % 3 == 0 else 200  # every third request fails
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/remove"
        request = http_load.Request(url, b"JPEGBYTES", "photo.jpg", (("model", "u2netp"),), timeout_s=30)
        load = http_load.drive(request, clients=2, per_client=3)
        assert load.clients == 2 and load.requests == 6 and load.errors == 2 and len(seen) == 6
        assert load.rate == pytest.approx(4 / load.seconds) and load.forward_passes is None
        assert all(b"JPEGBYTES" in body and b'name="model"' in body and b"u2netp" in body for body in seen)
        late = http_load.drive(request, clients=2, per_client=3, deadline=time.monotonic() - 1)
        assert late.requests == 0 and len(seen) == 6  # past its deadline: nothing sent
    finally:
        server.shutdown()
        server.server_close()


def test_the_precision_suite_converts_once_and_never_changes_that_conversion(flavour_files, monkeypatch):
    import torch

    from modnet_npu.bench import precision_suite as ps
    from modnet_npu.conversion import convert as cv

    path = flavour_files["official"]
    conversion = cv.convert(path)
    before = {k: v.clone() for k, v in conversion.model.state_dict().items()}
    monkeypatch.setattr(cv, "convert", lambda *a, **k: pytest.fail("the file was converted again"))
    layer = ps.FAULT_LAYERS[0]
    faulty = ps._layer_model(path, "faithful", layer, conversion=conversion)
    assert torch.equal(faulty.get_submodule(layer).weight, before[f"{layer}.weight"] * 1.01)
    ps._layer_model(path, "optimized", layer, conversion=conversion)
    ps._torch_engine(path, "faithful", "fp16", "cpu", 1, conversion=conversion).close()  # casts a model of its own
    after = conversion.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_the_golden_section_scores_every_engine_against_onnx_runtimes_matte(flavour_files):
    from modnet_npu.bench import precision_suite as ps
    from modnet_npu.conversion.convert import convert

    path = flavour_files["official"]
    rows = ps.measure_golden(path, sizes=((64, 64),), batches=(1, 2), conversion=convert(path), log=lambda m: None)
    assert [(r.kind, r.precision, r.batch) for r in rows] == [(k, p, b) for k, p in ps.GOLDEN_KINDS for b in (1, 2)]
    for r in rows:
        if r.kind == "ort":
            assert (r.agreement.mae, r.agreement.max_level_error) == (0.0, 0)  # the golden is its own matte
        elif r.precision == "fp32":  # the fp32 rule: within 0.5 + 255 * 1e-4 of the golden level
            assert r.agreement.max_d <= 0.5 + 255 * 1e-4 and r.agreement.max_level_error <= 1
    table = ps.golden_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| ONNX Runtime | fp32 | 64² | 1 | 0 | 0% | 0 |")
