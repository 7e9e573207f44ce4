from __future__ import annotations

import importlib.util

import pytest
import torch

from modnet_npu.runtime import devices
from fake_npu import FakeNpu, fake_device


def test_cpu_and_auto_on_a_cpu_machine():
    assert devices.select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and importlib.util.find_spec("torch_npu") is None:
        assert devices.select_device("auto").type in ("cpu", "mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "npu:-1", ""])
def test_unknown_spec(spec):
    with pytest.raises(devices.DeviceError, match="unknown device"):
        devices.select_device(spec)


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_npu_without_torch_npu_is_a_clear_error():
    with pytest.raises(devices.DeviceError, match="torch_npu"):
        devices.select_device("npu")
    with pytest.raises(devices.DeviceError, match="torch_npu"):
        devices.select_device("npu:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(devices.DeviceError, match="CUDA is not available"):
        devices.select_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_out_of_range():
    with pytest.raises(devices.DeviceError, match="only"):
        devices.select_device(f"cuda:{torch.cuda.device_count()}")


def test_cpu_helpers():
    cpu = torch.device("cpu")
    assert devices.prepare(cpu) == {}
    settings = devices.activate(cpu, strict_fp32=True)
    assert settings == devices.DeviceSettings("cpu") and settings.current is None
    devices.synchronize(cpu)
    devices.reset_peak_memory(cpu)
    assert devices.peak_memory_mb(cpu) is None
    current, peak = devices.process_rss_mb()
    assert 0 < current <= peak + 1
    env = devices.environment(cpu)
    assert env.torch == torch.__version__ and env.device == "cpu" and env.cpu_count >= 1


# --------------------------------------------------------------------------
# activate, read_back, synchronize: NPU through tests/fake_npu.py, CUDA through
# monkeypatched torch.cuda functions (CPU torch has no device of either kind)
# --------------------------------------------------------------------------

def test_activate_npu_sets_options_before_the_device_and_makes_it_current():
    with FakeNpu(device_count=2) as npu:
        settings = devices.activate(fake_device(1), strict_fp32=False)
    names = npu.names()
    assert npu.called("set_device") == [(1,)] and npu.current == 1
    # the internal-format switch goes in before anything can initialise device 1
    assert names.index("config.allow_internal_format") < names.index("set_device")
    assert npu.called("config.allow_internal_format") == [(False,)]
    assert settings.requested == {"ALLOW_INTERNAL_FORMAT": "disable"}
    assert settings.current == 1 and settings.device == "npu:1"
    assert settings.in_force["ALLOW_INTERNAL_FORMAT"] == "disable"
    # without strict fp32 the device's own precision defaults stay in force
    assert "set_option" not in names and settings.in_force["ACL_PRECISION_MODE"] == "unset"
    assert settings.in_force["ALLOW_CONV_HF32"] == "unset"


def test_activate_npu_strict_fp32_sets_and_reads_back_every_option():
    with FakeNpu(device_count=1) as npu:
        settings = devices.activate(fake_device(0), strict_fp32=True)
        assert devices.prepare(fake_device(0)) == settings.requested  # the older flat call, same settings
    assert npu.called("set_option")[0] == ({"ACL_PRECISION_MODE": "must_keep_origin_dtype"},)
    assert npu.called("conv.allow_hf32") == npu.called("matmul.allow_hf32") == [(False,), (False,)]
    expected = {"ALLOW_INTERNAL_FORMAT": "disable", "ACL_PRECISION_MODE": "must_keep_origin_dtype",
                "ALLOW_CONV_HF32": "disable", "ALLOW_MATMUL_HF32": "disable"}
    assert settings.requested == expected and settings.in_force == expected
    assert settings.to_dict()["notes"] == []


def test_read_back_reports_what_the_device_stack_says_not_what_was_asked():
    # an option refused or overridden at initialisation shows up in read_back, not in requested
    with FakeNpu(device_count=1) as npu:
        settings = devices.activate(fake_device(0), strict_fp32=True)
        npu.options["ACL_PRECISION_MODE"] = "allow_fp32_to_fp16"
        assert devices.read_back(fake_device(0))["ACL_PRECISION_MODE"] == "allow_fp32_to_fp16"
    assert settings.requested["ACL_PRECISION_MODE"] == "must_keep_origin_dtype"


def test_a_set_option_error_is_reported_not_raised(monkeypatch):
    with FakeNpu(device_count=1):
        def refuse(option):
            raise RuntimeError("SetPrecisionMode failed\n[ERROR] details")

        monkeypatch.setattr(torch.npu, "set_option", refuse)
        settings = devices.activate(fake_device(0), strict_fp32=True)
    assert settings.requested["ACL_PRECISION_MODE"] == "not set (RuntimeError: SetPrecisionMode failed)"


@pytest.mark.parametrize("env, expected", [
    ({"TASK_QUEUE_ENABLE": "2"}, "export TASK_QUEUE_ENABLE=1"),
    ({"ACL_OP_INIT_MODE": "2"}, "export ACL_OP_INIT_MODE=0"),
])
def test_npu_environment_that_breaks_capture_or_aclop_is_noted_with_the_fix(monkeypatch, env, expected):
    for name in ("TASK_QUEUE_ENABLE", "ACL_OP_INIT_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with FakeNpu(device_count=1):
        settings = devices.activate(fake_device(0))
    assert len(settings.notes) == 1 and expected in settings.notes[0]
    assert (devices.graph_capture_blocker(fake_device(0)) is not None) == ("TASK_QUEUE_ENABLE" in env)
    assert devices.graph_capture_blocker(torch.device("cpu")) is None


def test_synchronize_and_memory_name_the_chosen_npu():
    with FakeNpu(device_count=2) as npu:
        npu.peak_bytes = 3 * 2**20
        devices.synchronize(fake_device(1))
        devices.reset_peak_memory(fake_device(1))
        npu.peak_bytes = 5 * 2**20
        assert devices.peak_memory_mb(fake_device(1)) == 5.0
        with devices.current(fake_device(1)):
            assert npu.current == 1
        assert npu.current == 0  # the context puts the previous device back
    assert npu.called("synchronize") == [(1,)]
    assert npu.called("reset_peak_memory_stats") == [(1,)] and npu.called("max_memory_allocated") == [(1,)]


def test_bf16_on_an_npu_without_it_fails_clearly():
    with FakeNpu(device_count=1, bf16=False, soc_name="Ascend910A"):
        with pytest.raises(devices.DeviceError, match=r"npu:0 \(Ascend910A\) has no bfloat16 support"):
            devices.check_bf16(fake_device(0))
    with FakeNpu(device_count=1, bf16=True):
        devices.check_bf16(fake_device(0))
    devices.check_bf16(torch.device("cpu"))  # slow there, but it runs


def test_cann_version_comes_from_torch_npu_when_it_knows(monkeypatch):
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    with FakeNpu(cann_version="8.5.0"):
        assert devices.cann_version() == "8.5.0"
        env = devices.environment(fake_device(0))
    assert env.cann == "8.5.0" and env.torch_npu == "2.9.0.post1" and env.device == "npu:0"


def test_one_line_keeps_the_type_and_the_first_line_only():
    err = RuntimeError("\nCannot run aclop operators\n[ERROR] ERR00007 PTA feature not supported")
    assert devices.one_line(err) == "RuntimeError: Cannot run aclop operators"
    assert devices.one_line(KeyError()) == "KeyError"


@pytest.fixture(autouse=True)
def tf32_switches():
    """activate(strict_fp32=True) changes these process-wide switches: put them back by assignment,
    the route torch reads them through (cuBLASModule has no plain attribute for monkeypatch's undo
    to restore: pytest >= 9 deletes it and the next read fails)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _FakeCuda:
    """Records what devices.py asks torch.cuda for."""

    def __init__(self, monkeypatch, bf16=True):
        self.calls: list[tuple] = []
        self.current = 0
        self.bf16 = bf16
        for name in ("set_device", "synchronize", "current_device", "is_bf16_supported", "get_device_name"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def set_device(self, index):
        self.calls.append(("set_device", index))
        self.current = index

    def synchronize(self, device=None):
        self.calls.append(("synchronize", device))

    def current_device(self):
        return self.current

    def is_bf16_supported(self, including_emulation=True):
        self.calls.append(("is_bf16_supported", including_emulation))
        return self.bf16

    def get_device_name(self, device=None):
        return "Tesla V100"


def test_activate_cuda_makes_the_device_current_and_strict_turns_tf32_off(monkeypatch):
    cuda = _FakeCuda(monkeypatch)
    monkeypatch.setattr(devices, "_new_tf32_api", lambda: False)  # a torch before 2.9: the legacy flags
    torch.backends.cudnn.allow_tf32 = True
    settings = devices.activate(torch.device("cuda", 1), strict_fp32=True)
    devices.synchronize(torch.device("cuda", 1))
    assert cuda.calls == [("set_device", 1), ("synchronize", 1)]
    assert settings.current == 1
    assert settings.in_force == {"cudnn.allow_tf32": "False", "cuda.matmul.allow_tf32": "False"}
    assert torch.backends.cudnn.allow_tf32 is False


def test_activate_cuda_without_strict_leaves_tf32_alone(monkeypatch):
    _FakeCuda(monkeypatch)
    monkeypatch.setattr(devices, "_new_tf32_api", lambda: False)
    torch.backends.cudnn.allow_tf32 = True
    settings = devices.activate(torch.device("cuda", 0))
    assert settings.requested == {} and settings.in_force["cudnn.allow_tf32"] == "True"


def test_bf16_on_a_cuda_device_without_it_fails_clearly(monkeypatch):
    cuda = _FakeCuda(monkeypatch, bf16=False)
    with pytest.raises(devices.DeviceError, match=r"cuda:0 \(Tesla V100\) has no bfloat16"):
        devices.check_bf16(torch.device("cuda", 0))
    assert ("is_bf16_supported", False) in cuda.calls  # emulated bf16 does not count


# --------------------------------------------------------------------------
# TF32 through torch's fp32_precision switches (torch 2.9+), where they exist
# --------------------------------------------------------------------------

needs_new_tf32_api = pytest.mark.skipif(not devices._new_tf32_api(), reason="this torch has no fp32_precision API")


@pytest.fixture
def cuda_stand_in(monkeypatch):
    """torch.cuda's device calls recorded; the fp32_precision switches saved and put back by hand
    (monkeypatch cannot: they live outside the objects' __dict__)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    switches = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
    saved = [s.fp32_precision for s in switches]
    yield calls
    for switch, value in zip(switches, saved):
        switch.fp32_precision = value


@needs_new_tf32_api
def test_strict_fp32_on_cuda_uses_the_fp32_precision_api(cuda_stand_in):
    settings = devices.activate(torch.device("cuda", 0), strict_fp32=True)
    assert settings.requested == {"cudnn.conv.fp32_precision": "ieee", "cuda.matmul.fp32_precision": "ieee"}
    assert settings.in_force == settings.requested and cuda_stand_in == [("set_device", 0)]
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"


@needs_new_tf32_api
def test_strict_fp32_works_after_something_else_used_the_new_api(cuda_stand_in):
    """The legacy flags raise once the new API set conv and RNN apart: the new API is used, and read back."""
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cudnn.allow_tf32  # noqa: B018  (what the old code read)
    default = devices.activate(torch.device("cuda", 0))
    assert default.requested == {} and default.in_force["cudnn.conv.fp32_precision"] == "tf32"
    strict = devices.activate(torch.device("cuda", 0), strict_fp32=True)
    assert strict.in_force["cudnn.conv.fp32_precision"] == "ieee"
