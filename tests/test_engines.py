"""Choosing an engine; TorchEngine readies the device (NPU through tests/fake_npu.py) and reports its fast path."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from modnet_npu.runtime import devices
from modnet_npu.runtime import engines
from modnet_npu.runtime.torch_engine import TorchEngine
from modnet_npu.runtime.acceleration import FastPathError
from fake_npu import ACLOP_CAPTURE_ERROR, FakeNpu, fake_device


def test_auto_backend_choice(monkeypatch):
    assert engines.choose_backend("ort", "auto")[0] == "ort"
    assert engines.choose_backend("auto", "cpu")[0] == "torch"
    monkeypatch.setattr(devices, "accelerator_signs", lambda: ("/dev/nvidia0",))  # a sign: torch is asked
    monkeypatch.setattr(devices, "select_device", lambda spec: torch.device("cpu"))
    backend, why = engines.choose_backend("auto", "auto")
    assert backend == "ort" and "faster engine" in why and "PyTorch finds no accelerator (/dev/nvidia0 seen)" in why
    monkeypatch.setattr(devices, "select_device", lambda spec: torch.device("cuda", 0))
    assert engines.choose_backend("auto", "auto") == ("torch", "accelerator cuda:0 found")


def test_auto_decides_without_asking_torch_where_no_accelerator_can_be(monkeypatch):
    def ask_torch(spec):
        raise AssertionError("torch was asked")

    monkeypatch.setattr(devices, "select_device", ask_torch)
    monkeypatch.setattr(devices, "accelerator_signs", lambda: ())
    backend, why = engines.choose_backend("auto", "auto")
    assert backend == "ort" and why.startswith("no torch_npu and no GPU driver on this machine: ")
    # signs, but no PyTorch to ask: ONNX Runtime, saying why
    monkeypatch.setattr(devices, "accelerator_signs", lambda: ("/dev/kfd",))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert engines.choose_backend("auto", "auto") == (
        "ort", "PyTorch is not installed (/dev/kfd seen): ONNX Runtime is the faster engine on a CPU")


def test_accelerator_signs_are_read_without_torch(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    npu: list[str] = []  # "torch_npu" there: torch_npu is importable
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if npu else None) if name == "torch_npu" else real(name, *a))
    monkeypatch.setattr(devices, "GPU_DRIVER_PATHS", (str(tmp_path / "nvidia[0-9]*"), str(tmp_path / "kfd")))
    monkeypatch.setattr(sys, "platform", "linux")
    assert devices.accelerator_signs() == ()
    (tmp_path / "nvidia1").touch()
    (tmp_path / "nvidia0").touch()
    assert devices.accelerator_signs() == (str(tmp_path / "nvidia0"),)  # one per driver path, not per GPU
    (tmp_path / "kfd").touch()
    npu.append("torch_npu")
    assert devices.accelerator_signs() == ("torch_npu installed", str(tmp_path / "nvidia0"), str(tmp_path / "kfd"))
    npu.clear()
    monkeypatch.setattr(sys, "platform", "darwin")  # MPS: torch is asked on every Mac
    assert devices.accelerator_signs() == ("macOS (MPS)",)
    monkeypatch.setattr(sys, "platform", "win32")  # drivers this does not read: torch is asked
    assert devices.accelerator_signs() == ("win32 (GPU drivers not looked for)",)


# --------------------------------------------------------------------------
# TorchEngine readies the device before the model reaches it: every entry point
# (pipeline, inference.py, the service, benchmarks) builds one. NPU through
# tests/fake_npu.py; the model records the fake's state when it is moved.
# --------------------------------------------------------------------------

class Probe(torch.nn.Module):
    """Doubles its input; when moved to a device, notes what the fake NPU had set by then."""

    def __init__(self, npu: FakeNpu, on_move=None):
        super().__init__()
        self.npu = npu
        self.on_move = on_move  # what the device stack does at initialisation (the first copy)
        self.at_move: dict | None = None

    def to(self, *args, **kwargs):
        if self.at_move is None and any(getattr(a, "type", None) == "npu" for a in args):
            self.at_move = {"options": dict(self.npu.options), "current": self.npu.current,
                            "calls": list(self.npu.names())}
            if self.on_move is not None:
                self.on_move(self.npu)
        return self  # CPU torch cannot hold npu tensors: the model stays where it is

    def forward(self, x):
        return x * 2


def test_engine_sets_the_npu_up_before_the_model_reaches_it():
    with FakeNpu(device_count=2) as npu:
        probe = Probe(npu)
        engine = TorchEngine(probe, fake_device(1), graphs="auto")
        settings = engine.device_settings()
    assert probe.at_move["options"]["ALLOW_INTERNAL_FORMAT"] == "disable"
    assert probe.at_move["current"] == 1 and "set_device" in probe.at_move["calls"]
    assert "ACL_PRECISION_MODE" not in probe.at_move["options"]  # inference keeps the device's HF32 default
    assert settings.current == 1 and settings.in_force["ALLOW_INTERNAL_FORMAT"] == "disable"
    assert engine.fast_path == "graph capture" and engine.description == "PyTorch on npu:1 (fp32; graph capture)"


def test_engine_strict_fp32_is_in_force_before_the_first_forward():
    with FakeNpu(device_count=1) as npu:
        probe = Probe(npu)
        engine = TorchEngine(probe, fake_device(0), strict_fp32=True)
    assert probe.at_move["options"]["ACL_PRECISION_MODE"] == "must_keep_origin_dtype"
    assert probe.at_move["options"]["ALLOW_CONV_HF32"] == "disable"
    assert engine.settings.in_force["ALLOW_MATMUL_HF32"] == "disable"


def test_engine_reads_the_options_back_once_the_device_is_initialised():
    def cann_refuses_precision_mode(npu):  # CANN applies deferred options at initialisation, and may not
        npu.options["ACL_PRECISION_MODE"] = "allow_fp32_to_fp16"

    with FakeNpu(device_count=1) as npu:
        engine = TorchEngine(Probe(npu, cann_refuses_precision_mode), fake_device(0), strict_fp32=True)
    assert engine.settings.requested["ACL_PRECISION_MODE"] == "must_keep_origin_dtype"
    assert engine.settings.in_force["ACL_PRECISION_MODE"] == "allow_fp32_to_fp16"


def test_engine_synchronises_the_chosen_npu_and_calls_it_there():
    with FakeNpu(device_count=2) as npu:
        engine = TorchEngine(Probe(npu), fake_device(1), graphs="off")
        npu.calls.clear()
        engine.timed(torch.ones(1, 3, 4, 4))
    assert npu.called("synchronize") == [(1,), (1,)]
    assert npu.called("device.__enter__") == [(1,)]  # the forward ran with device 1 current


def test_engine_graphs_on_fails_with_the_capture_reason():
    with FakeNpu(device_count=1, capture_error=ACLOP_CAPTURE_ERROR) as npu:
        engine = TorchEngine(Probe(npu), fake_device(0), graphs="on")
        x = torch.ones(1, 3, 4, 4)
        engine.runner(x)
        with pytest.raises(FastPathError, match="graph capture failed for input 1x3x4x4 float32 .*aclop"):
            engine.runner(x)


def test_engine_graphs_auto_reports_failed_captures():
    logged = []
    with FakeNpu(device_count=1, capture_error=ACLOP_CAPTURE_ERROR) as npu:
        engine = TorchEngine(Probe(npu), fake_device(0), graphs="auto", log=logged.append)
        x = torch.ones(1, 3, 4, 4)
        for _ in range(3):
            assert torch.equal(engine.runner(x), x * 2)
        stats = engine.fast_path_stats()
    assert engine.fast_path == "graph capture failed (eager)"
    assert stats.captures == 0 and "aclop" in stats.capture_failures["1x3x4x4 float32"]
    assert len(logged) == 1


def test_engine_bf16_on_an_npu_without_it_fails_before_the_model_moves():
    with FakeNpu(device_count=1, bf16=False) as npu:
        probe = Probe(npu)
        with pytest.raises(devices.DeviceError, match="no bfloat16 support"):
            TorchEngine(probe, fake_device(0), precision="bf16")
    assert probe.at_move is None
    assert npu.names().index("config.allow_internal_format") < npu.names().index("is_bf16_supported")


def test_engine_notes_the_environment(monkeypatch):
    monkeypatch.setenv("ACL_OP_INIT_MODE", "2")
    monkeypatch.delenv("TASK_QUEUE_ENABLE", raising=False)
    logged = []
    with FakeNpu(device_count=1) as npu:
        TorchEngine(Probe(npu), fake_device(0), log=logged.append)
    assert logged and logged[0].startswith("note: ACL_OP_INIT_MODE=2")


def test_engine_on_the_cpu_reports_its_fast_path():
    engine = TorchEngine(torch.nn.Conv2d(3, 1, 1), torch.device("cpu"), threads=2)
    try:
        out = engine.infer(np.ones((2, 3, 8, 8), np.float32))
        stats = engine.fast_path_stats()
    finally:
        engine.close()
    assert out.shape == (2, 8, 8)
    assert stats.pieces == ("batch-parallel x2",) and stats.to_dict()["captures"] == 0
    assert engine.device_settings() == devices.DeviceSettings("cpu")


def test_matting_on_npu_1_readies_device_1_before_the_model_reaches_it(monkeypatch, webnn_file):
    """The path of inference.py and the service: Matter -> open_engine -> TorchEngine."""
    from modnet_npu.conversion import convert as convert_onnx_to_torch
    from modnet_npu.matting.matter import Matter

    with FakeNpu(device_count=2) as npu:
        probe = Probe(npu)
        built = []
        monkeypatch.setattr(convert_onnx_to_torch, "build_torch_model_from_onnx",
                            lambda path, device=None, optimize=True: built.append(device) or probe)
        # CPU torch cannot make torch.device("npu", 1); select_device's own checks are in test_devices
        monkeypatch.setattr(devices, "select_device", lambda spec: fake_device(int(spec.partition(":")[2] or 0)))
        matter = Matter(model=webnn_file, backend="torch", device="npu:1", graphs="off")
    assert built == [None]  # built on the CPU, moved by the engine once the device is ready
    assert probe.at_move["options"]["ALLOW_INTERNAL_FORMAT"] == "disable" and probe.at_move["current"] == 1
    assert matter.engine.description == "PyTorch on npu:1 (fp32; eager)"


# --------------------------------------------------------------------------
# A fixed set of shapes: batches padded up to a few sizes, prepared at warm-up (graphs through TapeGraphs,
# tests/fake_replay.py: a CPU stand-in whose replays recompute, so a stale or mixed-up row would show)
# --------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """Two convolutions that note every input shape they are run at (eager runs and captures alike)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 1, 3, padding=1)
        self.shapes: list[tuple] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.reference(x)

    def reference(self, x):
        return torch.sigmoid(self.b(torch.relu(self.a(x))))


def _tape_engine(model, logged=None):
    from fake_replay import TapeGraphs

    return TorchEngine(model, torch.device("cpu"), graphs="on", threads=1, capture=TapeGraphs(),
                               log=(logged.append if logged is not None else lambda m: None))


def test_batches_are_padded_up_to_a_few_sizes_and_the_padding_is_dropped():
    model = Recorder().eval()
    engine = _tape_engine(model)
    assert engine.batch_sizes == (1, 2, 4, 8)
    gen = torch.Generator().manual_seed(3)
    for n in (1, 3, 5, 11, 3, 6, 2, 7, 11):
        x = torch.randn(n, 3, 8, 8, generator=gen).numpy()
        with torch.inference_mode():
            want = model.reference(torch.from_numpy(x))[:, 0].numpy()
        got = engine.infer(x)
        assert got.shape == (n, 8, 8) and np.allclose(got, want, atol=1e-6)
    assert {s[0] for s in model.shapes} <= {1, 2, 4, 8}  # 11 images: a batch of 8, then 3 padded to 4
    assert engine.fast_path_stats().captures >= 2


def test_warm_up_prepares_the_set_then_nothing_is_captured_inside_a_request():
    logged = []
    model = Recorder().eval()
    engine = _tape_engine(model, logged)
    stats = engine.warm_up([(8, 8), (16, 8)], max_batch=4)
    assert stats.batch_sizes == (1, 2, 4) and stats.sealed and stats.captures == 6
    assert [p.shape for p in stats.prepared][:3] == ["1x3x8x8 float32", "2x3x8x8 float32", "4x3x8x8 float32"]
    assert {p.how for p in stats.prepared} == {"captured"} and stats.warm_up_s >= 0
    assert stats.warm_up_memory == "process resident memory"
    assert "batches 1,2,4 at 8x8, 16x8 prepared" in engine.description
    model.shapes.clear()
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8), dtype=np.float32)
    with torch.inference_mode():
        want = model.reference(torch.from_numpy(x))[:, 0].numpy()
    assert np.allclose(engine.infer(x), want, atol=1e-6)  # 3 images padded to the prepared 4
    assert model.shapes == [] and engine.fast_path_stats().captures == 6  # a replay: the model did not run
    odd = np.zeros((3, 3, 8, 16), np.float32)  # a size outside the set: eager at its own batch, logged once
    engine.infer(odd)
    engine.infer(odd)
    after = engine.fast_path_stats()
    assert model.shapes == [(3, 3, 8, 16)] * 2 and after.captures == 6
    assert after.outside_set == ("3x3x8x16 float32",)
    assert len([m for m in logged if "outside the prepared shape set" in m]) == 1
    assert after.to_dict()["batch_sizes"] == [1, 2, 4]


def test_warm_up_without_a_per_shape_fast_path_runs_the_first_forwards():
    model = Recorder().eval()
    engine = TorchEngine(model, torch.device("cpu"), threads=1)
    stats = engine.warm_up([(8, 8)], max_batch=8)
    assert model.shapes == [(1, 3, 8, 8), (2, 3, 8, 8)] and not stats.sealed and stats.batch_sizes == ()
    assert engine.description == "PyTorch on cpu (fp32; eager)"
    engine.infer(np.zeros((3, 3, 8, 8), np.float32))
    assert model.shapes[-1] == (3, 3, 8, 8)  # no padding where any shape costs the same


def test_matter_warm_up_on_onnx_runtime_runs_the_first_forwards(webnn_file):
    from modnet_npu.matting.matter import Matter

    with Matter(model=webnn_file, backend="ort", threads=1) as matter:
        seen = []
        infer = matter.engine.infer
        matter.engine.infer = lambda x: seen.append(x.shape) or infer(x)
        matter.warm_up(max_batch=8)
    assert seen == [(1, 3, 256, 256), (2, 3, 256, 256)]  # the file's fixed size, one image then two


def test_compiled_packages_go_to_the_models_dir_asked_for(webnn_file, tmp_path):
    """--models-dir's .compile-cache, as --help says (it was always models/.compile-cache)."""
    from modnet_npu.runtime.options import EngineOptions

    options = EngineOptions(model=webnn_file, backend="torch", device="cpu", compile=True, models_dir=str(tmp_path))
    engine = engines.open_engine("torch", webnn_file, options)  # nothing is compiled before a shape is prepared
    assert engine.runner.compiled.cache_dir == str(tmp_path / ".compile-cache")
    assert (tmp_path / ".compile-cache").is_dir() and engine.batch_sizes == (1, 2, 4, 8)


def test_the_arena_is_handed_back_only_after_a_forward_larger_than_asked(flavour_files):
    from modnet_npu.runtime.engines import OrtEngine

    engine = OrtEngine(flavour_files["official"], threads=1)
    small, large = np.zeros((1, 3, 64, 64), np.float32), np.zeros((3, 3, 64, 64), np.float32)
    assert engine._run_options(large) is None  # a one-off run keeps ONNX Runtime's defaults
    engine.shrink_arena_above = 2 * 64 * 64
    assert engine._run_options(small) is None
    options = engine._run_options(large)
    assert options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert engine.infer(large).shape == (3, 64, 64) and engine.infer(small).shape == (1, 64, 64)
