"""The pipeline over many images and sizes, with ground truth and the layer-by-layer comparison."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from modnet_npu.runtime import torch_engine
import run_npu_inference as rni
from conftest import PORTRAIT

FAST = ["--runs", "2", "--warmup", "0", "--batch-sizes", "1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three differently sized photos, and a ground-truth alpha for each (a blurred disc)."""
    root = tmp_path_factory.mktemp("photos")
    images, alphas = root / "images", root / "alphas"
    images.mkdir()
    alphas.mkdir()
    base = Image.open(PORTRAIT).convert("RGB")
    for name, size in (("portrait", (300, 420)), ("landscape", (600, 300)), ("tiny", (60, 40))):
        base.resize(size).save(images / f"{name}.jpg", quality=92)
        w, h = size
        yy, xx = np.mgrid[:h, :w]
        disc = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2).astype(np.uint8) * 255
        Image.fromarray(disc).save(alphas / f"{name}.png")
    return images, alphas


def _corrupt_landscape(monkeypatch):
    """The PyTorch engine goes wrong on the landscape's input shape only (128 high, 256 wide)."""
    real = torch_engine.TorchEngine.infer

    def infer(self, x):
        out = real(self, x)
        return out + 0.2 if x.shape[2:] == (128, 256) else out

    monkeypatch.setattr(torch_engine.TorchEngine, "infer", infer)


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = rni.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_many_images_sizes_and_ground_truth_with_one_failing(photos, flavour_files, tmp_path, monkeypatch):
    images, alphas = photos
    _corrupt_landscape(monkeypatch)
    out = tmp_path / "o"
    code, text, err = _main(["--model", flavour_files["official"], "--images", str(images), "--sizes", "128,192",
                             "--alphas", str(alphas), "--output-dir", str(out), *FAST])
    assert code == 3 and "parity FAILED" in err
    report = json.loads((out / "evaluation_report.json").read_text())
    acc = report["accuracy"]
    per = acc["per_image"]
    # 3 images x 2 sizes; the tiny one's two short sides round to distinct sizes too
    assert len(per) == 6 and {tuple(e["size"]) for e in per if "tiny" in e["path"]} == {(128, 192), (192, 288)}
    failing = [e for e in per if not e["passed"]]
    assert [e["path"].rsplit("/", 1)[1] for e in failing] == ["landscape.jpg"]  # only 128x256 was corrupted
    agg = acc["aggregate"]
    assert agg["cases_passing"] == 5 and agg["worst_image"].endswith("landscape.jpg") and agg["images"] == 3
    assert acc["passed"] is False and acc["max_error"] == pytest.approx(agg["worst_max_error"])
    assert [f.rsplit("/", 1)[1] for f in agg["failing"]] == ["landscape.jpg @ 128x256"]
    assert "landscape.jpg @ 128x256" in err  # the failing image is named on the error line
    gt = per[0]["ground_truth"]
    assert set(gt["ort"]) == {"mse", "mad", "sad", "grad", "conn"} and gt["ort"]["mad"] > 0
    # parity failed, so the layer-by-layer comparison ran once, on the worst case
    lw = acc["layerwise"]
    # the fault was injected after the model, so no layer diverges: the model itself is faithful
    assert lw["layers_compared"] > 69 and lw["first_divergence"] is None
    rows = json.loads((out / "layerwise.json").read_text())["rows"]
    assert rows[-1]["shape"][2:] == [128, 256]
    assert {"layerwise.json", "layerwise.png", "comparison.png"} <= set(report["outputs"])
    assert "layer by layer" in text and report["input"]["path"].endswith("landscape.jpg")


def test_layerwise_on_request_finds_no_divergence(flavour_files, tmp_path):
    out = tmp_path / "o"
    code, text, _ = _main(["--model", flavour_files["webnn"], "--layerwise", "--output-dir", str(out), *FAST])
    assert code == 0
    acc = json.loads((out / "evaluation_report.json").read_text())["accuracy"]
    assert acc["layerwise"]["first_divergence"] is None and acc["layerwise"]["layers_compared"] > 69
    rows = json.loads((out / "layerwise.json").read_text())["rows"]
    assert rows[-1]["rel"] < 1e-4 and (out / "layerwise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "first divergence: none" in text


@pytest.mark.parametrize("problem", ["missing", "mis-sized"])
def test_ground_truth_problems_are_one_line(problem, photos, flavour_files, tmp_path):
    images, alphas = photos
    bad = tmp_path / "alphas"
    bad.mkdir()
    for p in alphas.iterdir():
        if problem == "missing" and p.stem == "tiny":
            continue
        img = Image.open(p)
        (img.resize((17, 19)) if problem == "mis-sized" and p.stem == "tiny" else img).save(bad / p.name)
    code, text, err = _main(["--model", flavour_files["official"], "--images", str(images), "--alphas", str(bad),
                             "--output-dir", str(tmp_path / "o"), *FAST])
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "tiny" in err
    assert "Parity" not in text  # found while the inputs are read, before any inference
    assert not (tmp_path / "o" / "evaluation_report.json").exists()


@pytest.mark.parametrize("args,expect", [
    (["--sizes", "256,abc"], "size"),
    (["--sizes", ","], "at least one size"),
    (["--layer-threshold", "0"], "positive"),
    (["--alphas", "/nonexistent"], "not a folder"),
])
def test_new_options_are_checked_before_anything_runs(args, expect, tmp_path):
    code, _, err = _main([*args, "--output-dir", str(tmp_path / "o")])
    assert code == 2 and expect in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
