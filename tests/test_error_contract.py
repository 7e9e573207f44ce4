"""The one-line error contract of every command line, run as a user runs it (a subprocess).

A bad option: exit 2 and one stderr line ``error: ...``. A missing model file (for
synthetic_model.py, which reads none: an output folder that is a file): a non-zero exit and
one ``error:`` line. Never a traceback, never anything written. The messages particular to
each tool are tested beside the tool; this file owns the contract they all share.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PORTRAIT, ROOT

BAD_OPTION = "--no-such-option"
TIMEOUT_S = 300  # a command that starts its work instead of failing is cut off here (and fails the test)


def missing_model_args(work: Path) -> dict[str, list[str]]:
    """Each command with a model file that does not exist, and otherwise sound arguments (test_startup runs
    them too, to see that the refusal comes before torch and onnx are imported)."""
    missing, out = str(work / "missing.onnx"), str(work / "out")
    return {
        "run_npu_inference.py": ["--model", missing, "--offline", "--output-dir", out],
        "inference.py": [str(PORTRAIT), "-o", out, "--model", missing, "--offline"],
        "serve.py": ["--model", missing, "--offline", "--port", "0"],
        "benchmark.py": ["batch", "--model", missing],
        "convert_onnx_to_torch.py": [missing, "-o", str(work / "out.pt")],
        "modnet_arch.py": [missing],
        "weight_extractor.py": [missing, "--npz", str(work / "out.npz")],
        # reads no model: writes the model files, here into a folder that is a regular file
        "synthetic_model.py": ["--out-dir", str(work / "a-file"), "--flavour", "webnn"],
    }


COMMANDS = tuple(missing_model_args(Path("/")))
CASES = ("bad-option", "missing-file")


@dataclass(frozen=True)
class Run:
    code: int | None  # None: cut off after TIMEOUT_S
    stderr: str
    written: tuple[str, ...]  # what the command left in its working folder


def _run(command: str, case: str, work: Path) -> Run:
    work.mkdir(parents=True)
    (work / "a-file").write_bytes(b"keep")
    args = missing_model_args(work)[command]
    if case == "bad-option":
        args = [*args, BAD_OPTION]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run([sys.executable, str(ROOT / command), *args], cwd=work, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stderr = None, exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    written = tuple(sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.name != "a-file"))
    return Run(code, stderr, written)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], Run]:
    """Every command in both cases, as many at once as there are CPUs (each one starts Python and torch)."""
    root = tmp_path_factory.mktemp("contract")
    jobs = [(command, case) for command in COMMANDS for case in CASES]
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda job: _run(*job, root / f"{job[0]}-{job[1]}"), jobs)
        return dict(zip(jobs, results))


def _one_error_line(run: Run) -> str:
    assert run.code is not None, f"still running after {TIMEOUT_S} s: {run.stderr[-500:]}"
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, f"expected one 'error:' line, got:\n{run.stderr}"
    assert run.written == (), f"written despite the error: {run.written}"
    return errors[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_option_is_one_error_line_and_exit_2(runs, command):
    run = runs[(command, "bad-option")]
    line = _one_error_line(run)
    assert run.code == 2 and BAD_OPTION in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_model_file_is_one_error_line_and_a_failure(runs, command):
    run = runs[(command, "missing-file")]
    _one_error_line(run)
    assert run.code not in (0, None) and run.code > 0
