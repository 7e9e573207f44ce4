"""The benchmark entry points run end to end (tiny sizes: this checks the plumbing, not speed)."""
from __future__ import annotations

import json

import benchmark


def test_engines_suite_smoke(tmp_path, flavour_files, capsys):
    out = tmp_path / "engines.json"
    code = benchmark.main(["engines", "--model", flavour_files["official"], "--sizes", "64", "--batches", "1,2",
                           "--rounds", "2", "--warmup", "0", "--no-compile", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [(r["size"], r["batch"]) for r in rows] == [(64, 1), (64, 2)]
    for r in rows:
        assert set(r["median_ms"]) == {"ort_cpu", "torch_faithful", "torch_optimized"}
        assert r["ratio_to_ort"]["ort_cpu"] == 1.0 and len(r["times_ms"]["ort_cpu"]) == 2
    assert "| 64 | 2 |" in capsys.readouterr().out


def test_batch_suite_smoke(tmp_path, webnn_file):
    out = tmp_path / "batch.json"
    assert benchmark.main(["batch", "--model", webnn_file, "--count", "2", "--batch", "2", "--size", "64",
                           "--rounds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["speedup"] > 0 and len(data["per_image_ms"]["batch_2"]) == 1
