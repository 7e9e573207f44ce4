"""Bad option values: one `error:` line, the usage exit status, and nothing written or loaded."""
from __future__ import annotations

import os

import pytest

import inference
import run_npu_inference
from conftest import PORTRAIT


def _nothing_written(root) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")]


@pytest.mark.parametrize("args,expect", [
    (["--size", "abc"], "size must be auto, N (short side) or HxW, got 'abc'"),
    (["--size", "-32"], "out of range"),
    (["--size", "0"], "out of range"),
    (["--size", "99999"], "out of range: each side must be 32..4096 pixels"),
    (["--size", "256x100"], "multiples of 32"),
    (["--warmup", "-1"], "--warmup must be 0 or more, got -1"),
    (["--threads", "-1"], "--threads must be 0 (all cores) or more, got -1"),
    (["--output-dir", ""], "--output-dir must not be empty"),
    (["--output-dir", "   "], "--output-dir must not be empty"),
])
def test_run_npu_inference_rejects_at_parse_time(args, expect, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # checked before any slow step: nothing may be resolved, downloaded or generated
    monkeypatch.setattr(run_npu_inference, "run", lambda opts: pytest.fail("the pipeline ran"))
    argv = ["--models-dir", str(tmp_path / "m"), "--offline", *args]
    if "--output-dir" not in args:
        argv += ["--output-dir", str(tmp_path / "out")]
    assert run_npu_inference.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and expect in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert _nothing_written(tmp_path) == []


@pytest.mark.parametrize("args,code,expect", [
    (["--threads", "-1"], 1, "--threads must be 0 (all cores) or more, got -1"),
    (["--size", "99999"], 1, "out of range: each side must be 32..4096 pixels"),
    (["--size", "abc"], 1, "size must be auto"),
    (["--batch", "0"], 2, "--batch must be at least 1"),
])
def test_inference_rejects_before_loading_a_model(args, code, expect, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inference, "Matter", lambda *a, **k: pytest.fail("a model was loaded"))
    assert inference.main([str(PORTRAIT), "-o", str(tmp_path / "out"), "--models-dir", str(tmp_path / "m"),
                           *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err
    assert _nothing_written(tmp_path) == []
    assert os.path.exists(PORTRAIT)
