from __future__ import annotations

import importlib.util

import pytest
import torch

import devices


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
    devices.synchronize(cpu)
    devices.reset_peak_memory(cpu)
    assert devices.peak_memory_mb(cpu) is None
    current, peak = devices.process_rss_mb()
    assert 0 < current <= peak + 1
    env = devices.environment(cpu)
    assert env.torch == torch.__version__ and env.device == "cpu" and env.cpu_count >= 1
