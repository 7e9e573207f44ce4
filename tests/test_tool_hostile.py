"""Unlucky and hostile inputs to the matting tool, through ``inference.py`` as a user runs it.

Issue 18's tool items: output names that would collide, inputs that must never be
replaced, FIFOs, a model that yields NaN, model files ONNX Runtime refuses, output
folders that cannot take files, SIGTERM/SIGHUP during a video, endless stdin and
an image too large for the memory (both under a memory cap), a video whose
resolution changes, names near the file system's limit. Every failure is one
``error:`` line and a non-zero exit; nothing is lost, replaced or left half-written.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from conftest import PORTRAIT, ROOT, make_video

LONG = "m" * 236  # with "_matte.png" 246 bytes: fits; its temporary once did not (265)


class Ran(NamedTuple):
    returncode: int
    stderr: str


def _tool(*args: str) -> Ran:
    """``inference.py ARGS`` in this process (the libraries are loaded once for the whole file); the
    process-wide parts (signals, memory caps, stdin) are tested with real subprocesses below."""
    import inference

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = inference.main(list(args))
    return Ran(code, err.getvalue())


def _errors(proc: Ran) -> list[str]:
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and all(line.startswith("error: ") for line in lines), proc.stderr
    return lines


def _photo(path: Path, color=(200, 100, 50), size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------
# a folder of everything that once collided, hung or failed
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, webnn_file):
    from test_video import make_resizing_video

    root = tmp_path_factory.mktemp("hostile")
    for folder in ("A", "B"):
        _photo(root / folder / "x.jpg")
    tree = root / "tree"
    for name in ("a.jpg", "a.png", "a_jpg.png", "my.dir/a.jpg", f"{LONG}.png"):
        _photo(tree / name)
    (tree / "sub").mkdir()
    os.mkfifo(tree / "sub" / "f.png")  # reading it would wait for a writer forever
    make_resizing_video(tree / "switch.mp4")
    out = root / "out"
    # were the FIFO opened, this releases the run after 60 s (the opener then reads nothing) instead of hanging
    unblock = threading.Timer(60, _release, [tree / "sub" / "f.png"])
    unblock.start()
    try:
        proc = _tool(str(root / "A"), str(root / "B"), str(tree), "-o", str(out), "--recursive", "--mode", "matte",
                     "--model", webnn_file, "--backend", "ort", "--quiet")
    finally:
        unblock.cancel()
    return root, out, proc


def _release(fifo: Path) -> None:
    with contextlib.suppress(OSError):  # ENXIO: nobody is reading it, as it should be
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_clashing_names_are_refused_naming_both_inputs(hostile_run):
    root, out, proc = hostile_run
    assert proc.returncode == 1
    lines = _errors(proc)
    x = out / "x_matte.png"
    assert f"error: {root / 'A' / 'x.jpg'}: its output {x} would also be written for {root / 'B' / 'x.jpg'}; " \
           "not matted (rename one, or run them with different -o folders)" in lines
    assert any(line.startswith(f"error: {root / 'B' / 'x.jpg'}: its output {x}") for line in lines)
    a_jpg = out / "a_jpg_matte.png"
    assert any(line.startswith(f"error: {root / 'tree' / 'a.jpg'}: its output {a_jpg} would also be written for "
                               f"{root / 'tree' / 'a_jpg.png'};") for line in lines)
    assert any(line.startswith(f"error: {root / 'tree' / 'a_jpg.png'}: its output {a_jpg}") for line in lines)
    assert not x.exists() and not a_jpg.exists()


def test_everything_else_is_written_with_its_folders_kept(hostile_run):
    _, out, proc = hostile_run
    assert _tree(out) == sorted(["a_png_matte.png", f"{LONG}_matte.png", "my.dir", os.path.join("my.dir", "a_matte.png")])
    assert len(_errors(proc)) == 5  # four clashing inputs, one video


def test_a_fifo_under_recursive_is_skipped_not_waited_on(hostile_run):
    root, _, proc = hostile_run
    assert not any("f.png" in line for line in proc.stderr.splitlines())  # not opened, so not released either
    assert os.path.exists(root / "tree" / "sub" / "f.png")


def test_a_video_that_changes_resolution_is_an_input_problem(hostile_run):
    root, _, proc = hostile_run
    line = next(line for line in proc.stderr.splitlines() if "switch.mp4" in line)
    assert line.startswith(f"error: {root / 'tree' / 'switch.mp4'}: the resolution changes mid-stream")
    assert "writing" not in line


def test_overwrite_never_replaces_an_input(tmp_path, webnn_file):
    _photo(tmp_path / "in.png")
    _photo(tmp_path / "in_matte.png", color=(1, 2, 3))
    before = (tmp_path / "in_matte.png").read_bytes()
    proc = _tool(str(tmp_path / "in.png"), str(tmp_path / "in_matte.png"), "-o", str(tmp_path), "--overwrite",
                 "--mode", "matte", "--model", webnn_file, "--backend", "ort", "--quiet")
    assert proc.returncode == 1
    assert _errors(proc) == [f"error: {tmp_path / 'in.png'}: its output {tmp_path / 'in_matte.png'} is the input "
                             f"{tmp_path / 'in_matte.png'}; not written (inputs are never replaced)"]
    assert (tmp_path / "in_matte.png").read_bytes() == before
    assert _tree(tmp_path) == ["in.png", "in_matte.png", "in_matte_matte.png"]


# --------------------------------------------------------------------------
# models that cannot give a matte
# --------------------------------------------------------------------------


def _edited_model(src: str, dest: Path, edit) -> str:
    import onnx

    model = onnx.load(src)
    edit(model)
    onnx.save(model, str(dest))
    return str(dest)


def _nan_weights(model) -> None:
    from onnx import numpy_helper

    for i, init in enumerate(model.graph.initializer):
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 4:  # the first convolution's kernel
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.full_like(w, np.nan), init.name))
            return


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_a_model_that_yields_nan_is_an_error_not_a_matte(tmp_path, webnn_file, backend):
    model = _edited_model(webnn_file, tmp_path / "nan.onnx", _nan_weights)
    out = tmp_path / "out"
    device = ["--device", "cpu"] if backend == "torch" else []
    proc = _tool(str(PORTRAIT), "-o", str(out), "--mode", "matte", "--model", model, "--backend", backend, *device,
                 "--quiet")
    assert proc.returncode == 1
    assert _errors(proc) == [f"error: {PORTRAIT}: the model produced NaN or Inf values, not a matte "
                             "(is the model file broken?)"]
    assert not out.exists() or _tree(out) == []


def test_a_matter_checks_the_raw_output_before_clipping_hides_inf():
    from modnet_npu.matting.matter import Matter, NonFiniteMatteError

    class InfEngine:
        fixed_size = None

        def infer(self, x):
            return np.full((x.shape[0], x.shape[2], x.shape[3]), np.inf, np.float32)  # clipped, it would read 1.0

    from modnet_npu.runtime.options import EngineOptions

    matter = Matter.__new__(Matter)  # the engine alone, without opening a model
    matter.engine, matter.options = InfEngine(), EngineOptions(size="auto")
    with pytest.raises(NonFiniteMatteError):
        matter.mattes([np.zeros((64, 64, 3), np.uint8)])


def _float16_input(model) -> None:
    from onnx import TensorProto

    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16


def _opset_99(model) -> None:
    model.opset_import[0].version = 99


@pytest.mark.parametrize("edit,reason", [(_float16_input, "Type Error"), (_opset_99, "Opset 99")])
def test_a_model_onnx_runtime_refuses_is_one_line(tmp_path, webnn_file, edit, reason):
    model = _edited_model(webnn_file, tmp_path / "refused.onnx", edit)
    proc = _tool(str(PORTRAIT), "-o", str(tmp_path / "out"), "--model", model, "--backend", "ort", "--quiet")
    assert proc.returncode == 1
    [line] = _errors(proc)
    assert line.startswith(f"error: ONNX Runtime cannot load {model}: ") and reason in line
    assert "onnxruntime_src" not in line and "[ONNXRuntimeError]" not in line
    assert not (tmp_path / "out").exists()


def test_onnx_runtime_failing_on_an_input_is_a_typed_one_line_error(webnn_file):
    from modnet_npu.runtime.engines import OrtEngine, OrtRunError

    engine = OrtEngine(webnn_file, threads=1, validate=False)
    with pytest.raises(OrtRunError, match=r"^ONNX Runtime failed at input 250x256: ") as info:
        engine.infer(np.zeros((1, 3, 250, 256), np.float32))  # the static graph takes 256x256 only
    assert "\n" not in str(info.value).strip() and "onnxruntime_src" not in str(info.value)


# --------------------------------------------------------------------------
# the pipeline's output folder
# --------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["file", "/dev/null", "/proc", "/sys/kernel/out"])
def test_run_npu_inference_refuses_an_unwritable_output_folder_first(target, tmp_path, monkeypatch, capsys):
    import run_npu_inference

    if target == "file":
        target = str(tmp_path / "report.json")
        Path(target).write_text("{}")
    elif not os.path.exists(os.path.dirname(target) or target):
        pytest.skip(f"{target}: not on this system")
    monkeypatch.setattr(run_npu_inference, "run", lambda opts: pytest.fail("the pipeline ran"))
    code = run_npu_inference.main(["--offline", "--models-dir", str(tmp_path / "m"), "--output-dir", target])
    err = capsys.readouterr().err
    if target.startswith("/sys") and code != 2:
        pytest.skip("/sys is writable here")
    assert code == 2 and err.startswith(f"error: --output-dir {target}: ") and err.count("\n") == 1


@pytest.mark.parametrize("target", ["/dev/null", "/proc"])
def test_inference_refuses_an_unwritable_output_folder_before_any_model(target, tmp_path, monkeypatch):
    import inference

    if not os.path.exists(target):
        pytest.skip(f"{target}: not on this system")
    monkeypatch.setattr(inference, "Matter", lambda *a, **k: pytest.fail("a model was loaded"))
    proc = _tool(str(PORTRAIT), "-o", target)
    assert proc.returncode == 2 and len(_errors(proc)) == 1 and proc.stderr.startswith(f"error: -o {target}: ")


def test_the_printed_psnr_says_what_the_json_says():
    from modnet_npu.proof import report

    nan = report.error_metrics(np.full(4, np.nan), np.zeros(4))
    acc = report.Accuracy(**vars(nan), png=nan, thresholds={"mae": 1e-3, "max_error": 5e-2}, passed=False,
                          precision="fp32", device_settings={})
    row = next(line for line in report.accuracy_table(acc).splitlines() if line.startswith("| PSNR"))
    assert row.split("|")[2].strip() == report.jsonable(acc.psnr_db) == "nan"
    same = report.error_metrics(np.zeros(4), np.zeros(4))
    acc = report.Accuracy(**vars(same), png=same, thresholds={"mae": 1e-3, "max_error": 5e-2}, passed=True,
                          precision="fp32", device_settings={})
    row = next(line for line in report.accuracy_table(acc).splitlines() if line.startswith("| PSNR"))
    assert row.split("|")[2].strip() == report.jsonable(acc.psnr_db) == "inf"


# --------------------------------------------------------------------------
# SIGTERM and SIGHUP during a video
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    # long enough that the signal lands mid-video on a quiet machine too (240 frames could finish first)
    make_video(path, frames=2400)
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_a_video_cleans_up_like_ctrl_c(sig, long_clip, tmp_path, webnn_file):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "inference.py"), str(long_clip), "-o", str(out),
                             "--mode", "matte", "--mode", "cutout", "--model", webnn_file, "--backend", "ort",
                             "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and any(".part" in n for n in os.listdir(out))):  # mid-video: temporaries open
            assert proc.poll() is None and time.monotonic() < deadline, "the video ended before the signal"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert stderr.startswith("error: interrupted") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert os.listdir(out) == []  # no hidden .part.mov or .part.mp4 left for a re-run to trip over


# --------------------------------------------------------------------------
# memory: under a cap on the address space, set once the libraries are loaded
# --------------------------------------------------------------------------

_CAPPED = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import inference  # torch, ONNX Runtime and PIL mapped before the cap
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[2]), resource.RLIM_INFINITY))
sys.exit(inference.main(sys.argv[3:]))
"""


def _capped(extra_bytes: int, *args: str, **kwargs) -> subprocess.CompletedProcess:
    # the cap counts address space: per-thread malloc arenas (64 MB each) and thread stacks (8 MB each,
    # hence --threads 2 below) would make it depend on the machine's core count
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    return subprocess.run([sys.executable, "-c", _CAPPED, str(ROOT), str(extra_bytes), *args], capture_output=True,
                          env=env, timeout=180, **kwargs)


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")


@needs_proc
def test_endless_stdin_ends_in_one_line_under_a_memory_cap(webnn_file):
    from modnet_npu.matting.jobs import MAX_STDIN_BYTES

    with open("/dev/zero", "rb") as zero:
        proc = _capped(600_000_000, "-", "--mode", "matte", "--model", webnn_file, "--backend", "ort", "--threads",
                       "2", "--quiet", stdin=zero)
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr.decode() == f"error: stdin: more than {MAX_STDIN_BYTES} bytes; not read further\n"


def _blank_bmp(path: Path, width: int, height: int) -> None:
    """A black 24-bit BMP of any size in no time: a header, then a sparse run of zero bytes."""
    import struct

    row = (3 * width + 3) // 4 * 4
    header = struct.pack("<2sIHHI", b"BM", 54 + row * height, 0, 0, 54)
    header += struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, row * height, 2835, 2835, 0, 0)
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(54 + row * height)


@needs_proc
def test_an_image_too_large_for_the_memory_fails_alone(tmp_path, webnn_file):
    big, small = tmp_path / "in" / "big.bmp", tmp_path / "in" / "small.png"
    _photo(small)
    _blank_bmp(big, 12000, 10000)  # 120 MP: 480 MB in PIL, 360 MB more as RGB: over what the cap leaves
    out = tmp_path / "out"
    proc = _capped(700_000_000, str(big.parent), "-o", str(out), "--mode", "matte", "--batch", "4",
                   "--model", webnn_file, "--backend", "ort", "--threads", "2", "--quiet")
    stderr = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"error: {big}: ") and "out of memory" in stderr and stderr.count("\n") == 1
    assert _tree(out) == ["small_matte.png"]  # the other image is written; nothing partial of the big one


# --------------------------------------------------------------------------
# names near the file system's limit
# --------------------------------------------------------------------------


def test_the_ray_path_finds_the_shortened_temporaries_of_long_names(tmp_path):
    from modnet_npu.fileio import atomic_path, is_temp_name, temp_affixes
    from modnet_npu.matting.plan import Job
    from modnet_npu.matting.scaleout import _remove_partials

    dest = tmp_path / f"{'n' * 245}_matte.png"  # 255 bytes: its temporary's base is shortened
    with atomic_path(dest) as tmp:
        prefix, suffix = temp_affixes(dest)
        assert os.path.basename(tmp).startswith(prefix) and len(prefix) < len(dest.name)
        Path(tmp).write_bytes(b"done")
    left = tmp_path / f"{prefix}zz9_k3j2{suffix}"  # what a worker killed mid-write leaves
    left.write_bytes(b"half")
    assert is_temp_name(left.name) and len(os.fsencode(left.name)) <= 255
    _remove_partials([Job("in.png", "image", {"matte": str(dest)})])
    assert os.listdir(tmp_path) == [dest.name]
