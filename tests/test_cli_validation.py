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
    (["--threads", "-1"], "--threads must be 0 (automatic) or more, got -1"),
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


@pytest.mark.parametrize("args,expect", [
    (["--threads", "-1"], "--threads must be 0 (automatic) or more, got -1"),
    (["--size", "99999"], "out of range: each side must be 32..4096 pixels"),
    (["--size", "abc"], "size must be auto"),
    (["--size", "32x4160"], "out of range: each side must be 32..4096 pixels"),
    (["--max-side", "16"], "--max-side must be at least 32, got 16"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--backend", "ort", "--precision", "fp16"], "--precision fp16 needs --backend torch"),
    (["--batch", "0"], "--batch must be at least 1"),
])
def test_inference_rejects_before_loading_a_model(args, expect, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inference, "Matter", lambda *a, **k: pytest.fail("a model was loaded"))
    assert inference.main([str(PORTRAIT), "-o", str(tmp_path / "out"), "--models-dir", str(tmp_path / "m"),
                           *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err
    assert _nothing_written(tmp_path) == []
    assert os.path.exists(PORTRAIT)


def _tools(monkeypatch, tmp_path):
    """Each command line, with what it would do after checking its options replaced by a failure."""
    import benchmark
    import serve

    monkeypatch.setattr(inference, "Matter", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(run_npu_inference, "run", lambda opts: pytest.fail("the pipeline ran"))
    monkeypatch.setattr(serve, "_bind", lambda *a: pytest.fail("the port was taken"))
    monkeypatch.setattr(benchmark, "_run", lambda *a: pytest.fail("a suite ran"))
    return {
        "inference": (inference.main, [str(PORTRAIT), "-o", str(tmp_path / "out")]),
        "serve": (serve.main, ["--port", "0"]),
        "run_npu_inference": (run_npu_inference.main, ["--output-dir", str(tmp_path / "out")]),
        "benchmark": (benchmark.main, ["batch"]),
    }


@pytest.mark.parametrize("tool", ["inference", "serve", "run_npu_inference", "benchmark"])
@pytest.mark.parametrize("bad", [["--size", "abc"], ["--threads", "-1"], ["--threads", "two"], ["--device", "tpu"],
                                 ["--models-dir", "m", "--device", "cuda:x"]])
def test_the_same_bad_option_exits_2_in_every_tool(tool, bad, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main, args = _tools(monkeypatch, tmp_path)[tool]
    try:
        code = main([*args, *bad])
    except SystemExit as exc:  # argparse's own refusals (benchmark's --size is a number)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (tool, err)
    assert _nothing_written(tmp_path) == []
