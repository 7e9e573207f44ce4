"""Start-up: nothing imported that the chosen path does not use.

``import torch`` alone takes seconds, ``torch._dynamo`` as long again and ``onnx``
most of a second of CPU: the ONNX Runtime path (``--backend ort``, and ``auto`` on a
machine without an accelerator) runs without torch, the default model's check
without onnx (its digest is known), and the PyTorch path without ``--compile``
without ``torch._dynamo``. Each case runs the real command line in a fresh
interpreter and looks at what that process imported at the end.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import PORTRAIT, ROOT
from test_error_contract import missing_model_args

# A fresh interpreter: imports a command line's module, runs its main() on the arguments, and writes what the
# process imported (and torch's thread count, where torch was loaded) to a JSON file.
RUNNER = """
import json, sys
target, out, *argv = sys.argv[1:]
code = __import__(target).main(argv)
torch = sys.modules.get("torch")
with open(out, "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules),
               "torch_threads": torch.get_num_threads() if torch is not None else None}, fh)
"""


def _run(tmp_path: Path, target: str, *argv: str) -> tuple[dict, str]:
    out = tmp_path / "imported.json"
    done = subprocess.run([sys.executable, "-c", RUNNER, target, str(out), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["code"] == 0, done.stderr[-3000:]
    return result, done.stderr


@pytest.fixture
def photo(tmp_path: Path) -> str:
    path = tmp_path / "photo.jpg"
    Image.open(PORTRAIT).convert("RGB").resize((96, 64)).save(path)
    return str(path)


def _photo_run(tmp_path: Path, photo: str, model: str, *options: str) -> tuple[dict, str]:
    out = tmp_path / "out"
    result, log = _run(tmp_path, "inference", photo, "-o", str(out), "--model", model, "--mode", "cutout", *options)
    assert [p.name for p in out.iterdir()] == ["photo_cutout.png"]
    return result, log


def test_the_ort_path_imports_no_torch(tmp_path, photo, webnn_file):
    result, log = _photo_run(tmp_path, photo, webnn_file, "--backend", "ort", "--threads", "1")
    assert "torch" not in result["modules"] and "backend ort (asked for)" in log
    assert "onnx" in result["modules"]  # a file of unknown digest: the model check reads it in full


def test_auto_on_a_machine_without_an_accelerator_imports_no_torch(tmp_path, photo, webnn_file):
    from modnet_npu.runtime import devices

    if devices.accelerator_signs():
        pytest.skip(f"this machine shows {', '.join(devices.accelerator_signs())}: auto asks torch here")
    result, log = _photo_run(tmp_path, photo, webnn_file, "--threads", "1")  # --backend auto, the default
    assert "torch" not in result["modules"]
    assert "backend ort (no torch_npu and no GPU driver on this machine: ONNX Runtime is the faster" in log


def test_the_default_model_starts_without_onnx(tmp_path, photo, real_model):
    result, _ = _photo_run(tmp_path, photo, real_model, "--backend", "ort", "--threads", "1")
    assert "onnx" not in result["modules"] and "torch" not in result["modules"]


def test_the_known_contract_is_what_the_full_check_finds(real_model):
    from modnet_npu.graph import contract
    from modnet_npu.graph.weights import load_onnx
    from modnet_npu.source.resolve import KNOWN_SHA256, sha256_of

    digest = sha256_of(real_model)
    assert digest in contract.KNOWN_CONTRACTS and digest in KNOWN_SHA256.values()
    full = contract.check_parsed(real_model)
    assert (full.input_name, full.input_shape, full.output_shape) == contract.KNOWN_CONTRACTS[digest]
    assert contract.check_model(real_model) == full
    # the digest covers every byte the check reads: the file holds its weights itself
    model = load_onnx(real_model)
    assert not any(t.data_location == t.EXTERNAL for t in model.graph.initializer)


def test_a_copy_of_the_default_model_changed_by_one_byte_is_checked_in_full(monkeypatch, tmp_path, real_model):
    from modnet_npu.graph import contract

    data = bytearray(Path(real_model).read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights (most of the file): still a readable MODNet
    changed = tmp_path / "model.onnx"
    changed.write_bytes(bytes(data))
    calls = []
    real = contract.check_parsed
    monkeypatch.setattr(contract, "check_parsed", lambda path: calls.append(path) or real(path))
    assert contract.check_model(changed) == replace(contract.check_model(real_model), path=str(changed))
    assert calls == [str(changed)]


def test_the_torch_path_without_compile_imports_no_dynamo(tmp_path, photo, webnn_file):
    result, log = _photo_run(tmp_path, photo, webnn_file, "--backend", "torch", "--threads", "1")
    assert "torch" in result["modules"] and "backend torch (asked for)" in log
    assert not [m for m in result["modules"] if m.startswith(("torch._dynamo", "torch._inductor"))]
    # the entry point's thread count reached torch, which it no longer loads for it (setup_process defer_torch)
    assert result["torch_threads"] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's /proc/PID/maps")
@pytest.mark.parametrize("backend", ["ort", "auto"])
def test_the_service_on_ort_loads_no_torch(tmp_path, webnn_file, backend):
    from modnet_npu.runtime import devices
    from modnet_npu.service.child import ServerProcess

    if backend == "auto" and devices.accelerator_signs():
        pytest.skip(f"this machine shows {', '.join(devices.accelerator_signs())}: auto asks torch here")
    image = tmp_path / "photo.png"
    Image.open(PORTRAIT).convert("RGB").resize((96, 64)).save(image)
    args = ["--model", webnn_file, "--backend", backend, "--threads", "1"]
    with ServerProcess(args, log_path=str(tmp_path / "serve.log"), start_timeout=120) as server:
        answer = httpx.post(f"{server.url}/api/remove", files={"file": ("photo.png", image.read_bytes())},
                            timeout=60)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    libraries = {line.split()[-1] for line in maps.splitlines() if ".so" in line}
    assert any("onnxruntime" in lib for lib in libraries)  # the reading works: the engine's own library is there
    assert not [lib for lib in libraries if "libtorch" in lib], f"serve.py --backend {backend} loaded torch"


# The command-line faces answer --help and a bad option before the package's torch and onnx modules load; what
# they re-export (their __all__) is imported on first use (modnet_npu.cli.lazy_exports).
FACES = ("run_npu_inference", "convert_onnx_to_torch", "modnet_arch", "synthetic_model", "weight_extractor")
AS_COMMAND = """
import json, runpy, sys
path, *argv = sys.argv[1:]
sys.argv = [path, *argv]
try:
    runpy.run_path(path, run_name="__main__")
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": [m for m in ("torch", "onnx", "onnxruntime") if m in sys.modules]}),
      file=sys.stderr)
"""


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--no-such-option"], 2)])
def test_a_face_answers_help_and_bad_options_without_torch_or_onnx(face, argv, code):
    done = subprocess.run([sys.executable, "-c", AS_COMMAND, f"{face}.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    result = json.loads(done.stderr.splitlines()[-1])
    assert result == {"code": code, "loaded": []}, done.stderr[-3000:]
    # a required positional is missing before the bad option is reached: either way argparse's one line
    assert done.stdout.startswith("usage:") if code == 0 else done.stderr.startswith("error: ")


@pytest.mark.parametrize("face", FACES)
def test_every_name_a_face_exports_is_its_owners(face):
    import importlib
    import inspect

    module = importlib.import_module(face)
    for name in module.__all__:
        value = getattr(module, name)  # the first use imports the owning module
        if callable(value):  # a function or class: defined in the package under that name (main: the face's)
            owner = inspect.getmodule(value)
            assert owner is module if name == "main" else owner.__name__.startswith("modnet_npu."), name
            assert getattr(owner, name) is value, name
        else:  # data (synthetic_model.FLAVOURS)
            assert value, name
        assert name in dir(module)
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018  (an unknown name is still an AttributeError, not an import)


# Every command line, run in turn in one interpreter as a user runs it, on a model file that does not exist (for
# synthetic_model.py, an output folder that is a file): what each wrote to stderr, its status, and which of the
# slow packages the process had imported by then (cumulative: the first command to load one is the culprit).
REFUSALS = """
import contextlib, io, json, runpy, sys
root, commands = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
results = {}
for command, argv in commands.items():
    sys.argv = [command, *argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(f"{root}/{command}", run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code
    results[command] = {"code": code, "stderr": err.getvalue(),
                        "loaded": [m for m in ("torch", "onnx", "onnxruntime") if m in sys.modules]}
print(json.dumps(results))
"""


def test_a_missing_model_file_is_refused_before_torch_or_onnx_is_imported(tmp_path):
    # one line in a fraction of a second, not after the seconds torch and onnx take to import (a missing
    # file's text and status are the same either way: test_error_contract and each tool's tests)
    (tmp_path / "a-file").write_bytes(b"keep")
    commands = missing_model_args(tmp_path)
    done = subprocess.run([sys.executable, "-c", REFUSALS, str(ROOT), json.dumps(commands)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    missing = tmp_path / "missing.onnx"
    for command in commands:
        expected = (f"error: {tmp_path / 'a-file'}: is a file, not a folder\n" if command == "synthetic_model.py"
                    else f"error: {missing}: no such file\n")
        assert results[command] == {"code": 1, "stderr": expected, "loaded": []}, command
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]  # nothing written
