"""The fake torch_npu installs and uninstalls cleanly and records what code does with it."""
from __future__ import annotations

import sys

import pytest
import torch

from fake_npu import (
    ACLOP_CAPTURE_ERROR,
    MODULE_NAMES,
    TASK_QUEUE_CAPTURE_ERROR,
    FakeNpu,
    _TorchairImportError,
    fake_device,
)


def test_installs_and_removes_every_module():
    before = {k: sys.modules.get(k) for k in MODULE_NAMES}
    had_npu = "npu" in vars(torch)
    with FakeNpu() as npu:
        import torch_npu

        assert torch_npu is npu.torch_npu
        assert torch.npu is npu.npu is torch_npu.npu
        assert sys.modules["torch.npu"] is npu.npu
        assert sys.modules["torch_npu.npu.utils"] is torch_npu.npu.utils
        assert torch_npu.__version__ == "2.9.0.post1"
    assert {k: sys.modules.get(k) for k in MODULE_NAMES} == before
    assert ("npu" in vars(torch)) == had_npu


def test_restores_modules_that_were_there_before(monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "torchair", sentinel)
    with FakeNpu():
        assert sys.modules["torchair"] is not sentinel
    assert sys.modules["torchair"] is sentinel


def test_uninstalls_when_the_block_raises():
    with pytest.raises(KeyError):
        with FakeNpu():
            raise KeyError("boom")
    assert "torch_npu" not in sys.modules
    assert "npu" not in vars(torch)


def test_cannot_install_twice():
    fake = FakeNpu()
    with fake:
        with pytest.raises(RuntimeError):
            fake.install()


def test_records_device_calls_in_order():
    with FakeNpu(device_count=2, bf16=False, soc_name="Ascend910B3") as npu:
        assert torch.npu.is_available()
        assert torch.npu.device_count() == 2
        torch.npu.set_device("npu:1")
        assert torch.npu.current_device() == 1
        torch.npu.synchronize()
        torch.npu.synchronize(fake_device(0))
        with torch.npu.device(0):
            assert npu.current == 0
        assert npu.current == 1
        assert torch.npu.is_bf16_supported() is False
        assert torch.npu.get_device_name(fake_device(1)) == "Ascend910B3"
        with pytest.raises(AssertionError, match="Invalid device id"):
            torch.npu.get_device_name(2)
        with pytest.raises(ValueError, match="Expected a npu device"):
            torch.npu.set_device("cuda:0")
    assert npu.names()[:5] == ["is_available", "device_count", "set_device", "current_device", "synchronize"]
    assert npu.called("set_device") == [("npu:1",), ("cuda:0",)]  # recorded even when refused
    assert npu.called("synchronize") == [(None,), (fake_device(0),)]


def test_no_device_means_not_available():
    with FakeNpu(device_count=0):
        assert torch.npu.is_available() is False


def test_allow_internal_format_is_write_only_and_readable_through_get_option():
    with FakeNpu() as npu:
        import torch_npu

        assert torch_npu._C._npu_getOption("ALLOW_INTERNAL_FORMAT") is None  # never set
        torch.npu.config.allow_internal_format = False
        with pytest.raises(AttributeError):
            _ = torch.npu.config.allow_internal_format
        assert torch_npu._C._npu_getOption("ALLOW_INTERNAL_FORMAT") == b"disable"
        torch.npu.config.allow_internal_format = True
        assert torch_npu._C._npu_getOption("ALLOW_INTERNAL_FORMAT") == b"enable"
    assert npu.called("config.allow_internal_format") == [(False,), (True,)]
    assert npu.options["ALLOW_INTERNAL_FORMAT"] == "enable"


def test_preset_option_as_an_a3_part_sets_it():
    with FakeNpu(options={"ALLOW_INTERNAL_FORMAT": "disable"}):
        import torch_npu

        assert torch_npu._C._npu_getOption("ALLOW_INTERNAL_FORMAT") == b"disable"


def test_hf32_switches_and_set_option():
    with FakeNpu() as npu:
        import torch_npu

        assert torch_npu.npu.conv.allow_hf32 is True  # conv defaults on
        assert torch_npu.npu.matmul.allow_hf32 is False  # matmul defaults off
        torch_npu.npu.conv.allow_hf32 = False
        torch_npu.npu.matmul.allow_hf32 = True
        assert torch_npu.npu.conv.allow_hf32 is False
        assert torch_npu.npu.matmul.allow_hf32 is True
        torch_npu.npu.set_option({"ACL_PRECISION_MODE": "must_keep_origin_dtype"})
        with pytest.raises(ValueError):
            torch_npu.npu.set_option({"ACL_PRECISION_MODE": "fp16"})
        with pytest.raises(TypeError):
            torch_npu.npu.set_option([("ACL_PRECISION_MODE", "must_keep_origin_dtype")])
        assert torch_npu._C._npu_getOption("ACL_PRECISION_MODE") == b"must_keep_origin_dtype"
    assert npu.called("conv.allow_hf32") == [(False,)]
    assert npu.called("matmul.allow_hf32") == [(True,)]
    assert npu.called("set_option")[0] == ({"ACL_PRECISION_MODE": "must_keep_origin_dtype"},)


def test_cann_version():
    with FakeNpu(cann_version="8.2.RC1") as npu:
        import torch_npu

        assert torch_npu.npu.utils.get_cann_version() == "8.2.RC1"
        assert torch_npu.utils.get_cann_version("RUNTIME") == "8.2.RC1"
        assert torch_npu.npu.utils.get_cann_version("NOPE") == ""
    assert npu.called("get_cann_version") == [("CANN",), ("RUNTIME",), ("NOPE",)]


def test_memory_stats():
    with FakeNpu() as npu:
        npu.allocated_bytes, npu.peak_bytes = 10, 99
        assert torch.npu.max_memory_allocated(fake_device(0)) == 99
        torch.npu.reset_peak_memory_stats(fake_device(0))
        assert torch.npu.max_memory_allocated() == 10
    assert npu.names() == ["max_memory_allocated", "reset_peak_memory_stats", "max_memory_allocated"]


def _capture(mod, fn, static_in):
    """The capture pattern acceleration.py uses for CUDA and NPU graphs."""
    side = mod.Stream()
    side.wait_stream(mod.current_stream())
    with mod.stream(side):
        fn(static_in)
    mod.current_stream().wait_stream(side)
    graph = mod.NPUGraph()
    with mod.graph(graph):
        out = fn(static_in)
    return graph, out


def test_graph_capture_and_replay_are_recorded():
    with FakeNpu() as npu:
        default = torch.npu.current_stream()
        graph, out = _capture(torch.npu, lambda x: x * 2, torch.ones(3))
        assert torch.equal(out, torch.full((3,), 2.0))
        assert torch.npu.current_stream() is default  # streams restored
        graph.replay()
        graph.replay()
        assert graph.replays == 2
        with pytest.raises(RuntimeError, match="already owns a captured graph"):
            with torch.npu.graph(graph):
                pass
    names = npu.names()
    assert names.index("NPUGraph.capture_begin") < names.index("NPUGraph.capture_end") < names.index("NPUGraph.replay")
    assert npu.called("NPUGraph.capture_begin")[0] == (None, "global")
    assert ("synchronize", (None,)) in npu.calls  # graph.__enter__ synchronizes, as the real one does


def test_capture_error_is_raised_by_the_first_op_in_the_graph():
    with FakeNpu(capture_error=ACLOP_CAPTURE_ERROR) as npu:
        default = torch.npu.current_stream()
        with pytest.raises(RuntimeError, match="Cannot run aclop operators during NPU graph capture"):
            _capture(torch.npu, lambda x: x * 2, torch.ones(3))
        assert torch.npu.current_stream() is default
        assert torch.ones(2).sum().item() == 2.0  # no dispatch mode left behind
        graph = npu.graphs[-1]
        with pytest.raises(RuntimeError, match="without a preceding successful capture"):
            graph.replay()
    assert "NPUGraph.capture_end" in npu.names()


def test_capture_error_at_begin():
    with FakeNpu(capture_error="boom", capture_error_at="begin"):
        with pytest.raises(RuntimeError, match="boom"):
            with torch.npu.graph(torch.npu.NPUGraph()):
                pass


def test_task_queue_enable_2_breaks_capture(monkeypatch):
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")
    with FakeNpu():
        with pytest.raises(RuntimeError) as info:
            with torch.npu.graph(torch.npu.NPUGraph()):
                pass
    assert str(info.value) == TASK_QUEUE_CAPTURE_ERROR


def test_capture_on_the_default_stream_is_refused():
    with FakeNpu():
        with pytest.raises(RuntimeError, match="non-default stream"):
            torch.npu.NPUGraph().capture_begin()


def test_fake_torchair_backend_compiles_on_cpu():
    with FakeNpu() as npu:
        import torchair

        config = torchair.CompilerConfig()
        config.mode = "reduce-overhead"
        assert config.mode.value == "reduce-overhead"
        with pytest.raises(ValueError):
            config.no_such_option = 1
        with pytest.raises(TypeError):
            torchair.get_npu_backend(config)  # keyword-only, as in torchair
        backend = torchair.get_npu_backend(compiler_config=config)
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: x * 3 + 1, backend=backend, dynamic=False)
        assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 4.0))
        torch._dynamo.reset()
    assert npu.called("torchair.get_npu_backend") == [(config,)]
    assert npu.called("torchair.backend") == [(config, 1)]


def test_broken_torchair_imports_then_raises_on_use():
    cause = ModuleNotFoundError("No module named 'pkg_resources'")
    with FakeNpu(torchair_error=cause):
        import torchair  # succeeds, as with the real lazy module

        with pytest.raises(_TorchairImportError) as info:
            _ = torchair.get_npu_backend
        assert not isinstance(info.value, ImportError)
        assert isinstance(info.value, Exception)
        assert info.value.__cause__ is cause
        with pytest.raises(_TorchairImportError):
            from torchair import CompilerConfig  # noqa: F401
    assert "torchair" not in sys.modules
