"""Graph-capture bookkeeping, the CPU batch path and compilation, on the CPU; NPU capture and
torchair through the fake torch_npu (tests/fake_npu.py); real capture on CUDA when present."""
from __future__ import annotations

import copy
import platform
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from modnet_npu.runtime import acceleration as fp
from fake_npu import ACLOP_CAPTURE_ERROR, FakeNpu, fake_device
from modnet_npu.model.optimized import optimize


class FakeGraphs:
    """Captures by remembering the function; replays by calling it into the static output."""

    def __init__(self, fail_for: tuple = ()):
        self.captured = []
        self.fail_for = fail_for

    def __call__(self, fn, static_in):
        if tuple(static_in.shape) in self.fail_for:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured.append(tuple(static_in.shape))
        out = fn(static_in)

        def replay():
            out.copy_(fn(static_in))

        return fp.Captured(static_in, out, replay)


def _double(x):
    return x * 2


class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_capture_on_second_sight_then_replay():
    fake = FakeGraphs()
    cache = fp.GraphCache(_double, fake, max_graphs=2)
    a = torch.ones(1, 3, 4, 4)
    assert torch.equal(cache(a), a * 2) and fake.captured == []  # first sight: eager
    assert torch.equal(cache(a + 1), (a + 1) * 2) and fake.captured == [(1, 3, 4, 4)]
    out = cache(a + 2)
    assert torch.equal(out, (a + 2) * 2) and cache.replays == 2 and cache.captures == 1
    out.add_(100)  # the caller owns its result: the next replay is unaffected
    assert torch.equal(cache(a), a * 2)


def test_lru_keeps_a_bounded_set_of_shapes():
    fake = FakeGraphs()
    cache = fp.GraphCache(_double, fake, max_graphs=2, capture_after=1)
    shapes = [(1, 3, 4, 4), (1, 3, 8, 8), (1, 3, 4, 4), (2, 3, 4, 4)]
    for s in shapes:
        cache(torch.ones(s))
    assert list(k[0] for k in cache.graphs) == [(1, 3, 4, 4), (2, 3, 4, 4)]  # (1,3,8,8) was least recent


def test_failed_capture_falls_back_to_eager_for_that_shape():
    fake = FakeGraphs(fail_for=((1, 3, 4, 4),))
    cache = fp.GraphCache(_double, fake, capture_after=1)
    x = torch.ones(1, 3, 4, 4)
    for _ in range(3):
        assert torch.equal(cache(x), x * 2)
    assert cache.captures == 0 and "stream is capturing" in next(iter(cache.failed.values()))


def test_no_factory_on_cpu_means_eager():
    assert fp.graph_factory(torch.device("cpu")) is None
    runner = fp.make_runner(torch.nn.Identity(), torch.device("cpu"), graphs="auto", threads=1)
    assert runner.describe == "eager" and runner.graphs is None
    with pytest.raises(fp.FastPathError, match="not available on cpu"):
        fp.make_runner(torch.nn.Identity(), torch.device("cpu"), graphs="on")


def test_batch_parallel_gives_the_same_result(seeded_model):
    fast = optimize(copy.deepcopy(seeded_model))
    runner = fp.make_runner(fast, torch.device("cpu"), threads=2)
    assert "batch-parallel" in runner.describe
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = fast(x)
    assert torch.allclose(runner(x), ref, atol=1e-5)
    assert torch.allclose(runner(x[:1]), ref[:1], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for real graph capture")
def test_cuda_graph_capture_matches_eager(seeded_model):
    device = torch.device("cuda")
    fast = optimize(copy.deepcopy(seeded_model)).to(device)
    runner = fp.make_runner(fast, device, graphs="on")
    x = torch.randn(2, 3, 256, 256, device=device)
    with torch.no_grad():
        ref = fast(x)
    for _ in range(3):
        out = runner(x)
    assert runner.graphs.captures == 1 and runner.graphs.replays >= 2
    assert float((out - ref).abs().max()) <= 1e-5


class TwoConvs(torch.nn.Module):
    """Small enough for AOTInductor to compile in seconds."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.b(torch.relu(self.a(x))))


@pytest.fixture(scope="module")
def recompiled(tmp_path_factory):
    """TwoConvs compiled once for the module (AOTInductor's fixed cost is seconds even for two layers), into a
    cache where a cut-short package already sits at its name: found, refused in one line, compiled again."""
    torch.manual_seed(0)
    net, x, logged = TwoConvs().eval(), torch.randn(1, 3, 32, 32), []
    cache = tmp_path_factory.mktemp("compiled")
    compiled = fp.compile_model(net, torch.device("cpu"), str(cache), log=logged.append)
    with open(compiled.package_path(x), "wb") as fh:
        fh.write(b"PK\x03\x04 not a package")
    with torch.inference_mode():
        out = compiled(x)
    return types.SimpleNamespace(net=net, x=x, cache=cache, compiled=compiled, out=out, logged=logged)


def test_a_package_that_cannot_be_loaded_is_compiled_again_said_in_one_line(recompiled):
    """A cut-short or foreign package in the cache is not fatal: one line, then a fresh compilation."""
    compiled = recompiled.compiled
    with torch.no_grad():
        assert float((recompiled.out - recompiled.net(recompiled.x)).abs().max()) <= 1e-5
    stale = [m for m in recompiled.logged if m.startswith("compile cache:")]
    assert len(stale) == 1 and "\n" not in stale[0] and "compiling 1x3x32x32 float32 again" in stale[0]
    assert (compiled.stale, compiled.compiled_now, compiled.from_cache) == (1, 1, 0)


def test_compiled_package_is_cached_and_reused(recompiled, tmp_path):
    net, x, out = recompiled.net, recompiled.x, recompiled.out
    packages = list(recompiled.cache.glob(f"modnet-*-cpu-1x3x32x32-float32-*-{fp.architecture(torch.device('cpu'))}.pt2"))
    assert len(packages) == 1
    shutil.copy(packages[0], tmp_path / packages[0].name)
    # a new process would find the package: no second compilation
    logged = []
    second = fp.compile_model(net, torch.device("cpu"), str(tmp_path), log=logged.append)
    with torch.inference_mode():
        again = second(x)
    assert second.compiled_now == 0 and second.from_cache == 1
    assert torch.allclose(again, out, atol=1e-6)
    # sealed (after warm-up): a shape outside the set runs eagerly, logged once, never compiled
    second.seal()
    y = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        for _ in range(2):
            assert torch.allclose(second(y), net(y), atol=1e-6)
    assert second.compiled_now == 0 and len(list(tmp_path.glob("*.pt2"))) == 1
    assert [m for m in logged if "outside the compiled shape set" in m] == [
        "input 2x3x32x32 float32 is outside the compiled shape set: it runs eagerly"]
    # other weights, other package; the same weights in other code, other package
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.b.bias.add_(1.0)
    assert fp.model_digest(other) != fp.model_digest(net)
    picky = Picky().eval()
    picky.load_state_dict(net.state_dict())
    assert fp.model_digest(picky) != fp.model_digest(net)


def _digest_of(folder, source: str, monkeypatch) -> str:
    """The digest of ``Net`` of a module named ``netmod``, imported from ``folder``, whose forward returns
    ``source``: a class's file is found through its imported module (sys.modules), as for any model."""
    import importlib.util

    path = folder / "netmod.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("import torch\n\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.a = torch.nn.Conv2d(3, 1, 1)\n\n"
                    f"    def forward(self, x):\n        return {source}\n")
    spec = importlib.util.spec_from_file_location("netmod", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "netmod", module)
    torch.manual_seed(0)
    return fp.model_digest(module.Net())


def test_the_model_digest_reads_the_code_not_its_path(tmp_path, monkeypatch):
    """Same class name, same weights: another forward is another package; the same file elsewhere (a models
    folder moved with its cache, another checkout) is the same one."""
    doubled = _digest_of(tmp_path / "a", "self.a(x) * 2", monkeypatch)
    assert _digest_of(tmp_path / "b", "self.a(x) * 3", monkeypatch) != doubled
    assert _digest_of(tmp_path / "c", "self.a(x) * 2", monkeypatch) == doubled


def test_the_model_digest_takes_every_buffer(seeded_model):
    """The faithful form's BatchNorm counters are 0-d integer tensors (``--model-form faithful --compile``)."""
    assert len(fp.model_digest(seeded_model)) == 16
    assert fp.model_digest(seeded_model) != fp.model_digest(optimize(copy.deepcopy(seeded_model)))


def test_modnet_compiled_through_the_runner_matches_eager(seeded_model, request):
    """The one full MODNet compile of the suite (30 s of CPU on two cores), into pytest's cache: a package is
    reused only for the same weights, model code, compiler settings, torch and CPU (its name says so,
    ``model_digest``), so a warm cache loads what this very code compiled; a change to any of them compiles."""
    fast = optimize(copy.deepcopy(seeded_model))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = fast(x)
    cache = Path(request.config.cache.mkdir("modnet-compiled"))
    runner = fp.make_runner(fast, torch.device("cpu"), compile=True, threads=2, cache_dir=str(cache))
    out = runner(x)
    assert runner.describe == "compiled"  # no batch-parallel or graphs on top of a compiled model
    assert float((out - ref).abs().max()) <= 1e-4
    stats = runner.stats()
    assert (stats.compiled_now + stats.compiled_from_cache, stats.compiled_stale, stats.captures) == (1, 0, 0)
    for old in set(cache.glob("*.pt2")) - {Path(runner.compiled.package_path(x))}:
        old.unlink(missing_ok=True)  # earlier code's packages: never loaded again


def test_compile_without_a_cxx_compiler_is_one_clear_line(tmp_path):
    from torch._inductor import config

    # inductor's config is not a plain object: monkeypatch's undo deletes what it set (pytest >= 9)
    # and so hides the option for every later test; config.patch restores it through its own setter
    with config.patch({"cpp.cxx": (None, "no-such-compiler-anywhere")}):
        assert fp.cpp_compiler() is None
        with pytest.raises(fp.FastPathError, match=r"needs a C\+\+ compiler \(g\+\+\); install it") as err:
            fp.compile_model(TwoConvs(), torch.device("cpu"), str(tmp_path))
    assert config.cpp.cxx != (None, "no-such-compiler-anywhere")  # put back
    assert "\n" not in str(err.value)
    assert fp.cpp_compiler() is not None  # put back as it was


def test_a_failed_compilation_is_one_line(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("C++ compile error\n" + "g++ -O3 ... (a build log)\n" * 100)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    compiled = fp.compile_model(TwoConvs().eval(), torch.device("cpu"), str(tmp_path))
    with pytest.raises(fp.FastPathError) as err:
        compiled(torch.randn(1, 3, 32, 32))
    assert str(err.value) == ("--compile: compiling for input (1, 3, 32, 32) failed (RuntimeError: C++ compile "
                              "error); run without --compile")
    assert list(tmp_path.iterdir()) == []  # no half-written package left to be loaded next time


def test_the_compile_cache_key_names_the_device_architecture(monkeypatch, tmp_path):
    gpus = {0: ("NVIDIA H200", 9, 0), 1: ("NVIDIA A100-SXM4-80GB", 8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=gpus[i][0], major=gpus[i][1], minor=gpus[i][2]))
    assert fp.architecture(torch.device("cuda", 0)) == "sm90_NVIDIA_H200"
    assert fp.architecture(torch.device("cuda", 1)) == "sm80_NVIDIA_A100_SXM4_80GB"
    net, x = TwoConvs().eval(), torch.randn(1, 3, 32, 32)
    h200, a100 = (fp.AotCompiled(net, torch.device("cuda", i), str(tmp_path)).package_path(x) for i in (0, 1))
    assert h200 != a100 and h200.endswith("-sm90_NVIDIA_H200.pt2")  # an H200 package is never loaded on an A100
    with FakeNpu(device_count=1, soc_name="Ascend910B4"):
        assert fp.architecture(fake_device(0)) == "Ascend910B4"
    assert fp.architecture(torch.device("cpu")).startswith(platform.machine())


def test_compile_on_cuda_checks_the_toolkit_before_anything_is_built(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    cache = tmp_path / "cache"
    with pytest.raises(fp.FastPathError, match=r"^--compile on CUDA needs the CUDA toolkit .*CUDA_HOME") as err:
        fp.compile_model(TwoConvs(), torch.device("cuda", 0), str(cache))
    assert "\n" not in str(err.value) and not cache.exists()
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    with pytest.raises(fp.FastPathError, match="CUDA toolkit"):  # a folder without the runtime's headers
        fp.check_toolchain(torch.device("cuda", 0))
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    fp.check_toolchain(torch.device("cuda", 0))
    assert fp.cuda_toolkit() == str(toolkit)


class Picky(TwoConvs):
    def forward(self, x):
        if x.shape[-1] % 2:
            raise ValueError(f"width {x.shape[-1]} is odd")
        return super().forward(x)


def test_an_input_the_model_refuses_is_its_error_not_the_compilers(tmp_path):
    compiled = fp.compile_model(Picky().eval(), torch.device("cpu"), str(tmp_path))
    with pytest.raises(ValueError, match="width 9 is odd"), torch.inference_mode():
        compiled(torch.randn(1, 3, 8, 9))
    assert list(tmp_path.iterdir()) == []


def test_torchair_prepares_shapes_and_sealed_runs_others_eagerly():
    logged = []
    with FakeNpu(device_count=1) as npu:
        runner = fp.make_runner(TwoConvs().eval(), fake_device(0), compile=True, log=logged.append)
        done = runner.prepare(torch.randn(2, 3, 16, 16))
        runner.seal()
        backend_calls = len(npu.called("torchair.backend"))
        x = torch.randn(1, 3, 16, 16)
        out = runner(x)
        runner(x)
        stats = runner.stats()
    assert done.how == "compiled" and stats.compiled_now == 1 and stats.sealed
    assert backend_calls == 1 and len(npu.called("torchair.backend")) == 1  # nothing compiled after sealing
    assert torch.allclose(out, runner.compiled.model(x), atol=1e-6)
    assert stats.outside_set == ("1x3x16x16 float32",) and len(logged) == 1
    assert [p.shape for p in stats.prepared] == ["2x3x16x16 float32"]


def test_compile_refuses_mps():
    with pytest.raises(fp.FastPathError, match="not supported on mps"):
        fp.compile_model(torch.nn.Identity(), torch.device("mps"))


# --------------------------------------------------------------------------
# NPU, through tests/fake_npu.py: calls, not tensors (CPU torch has no npu device)
# --------------------------------------------------------------------------


def test_npu_capture_runs_on_the_chosen_device_and_replays():
    with FakeNpu(device_count=2) as npu:
        runner = fp.make_runner(Double(), fake_device(1), graphs="on")
        x = torch.ones(1, 3, 4, 4)
        for _ in range(3):
            assert torch.equal(runner(x), x * 2)
        stats = runner.stats()
        assert npu.current == 0  # the device context of each call is left again
    assert (stats.captures, stats.replays, stats.capture_failures) == (1, 2, {})
    assert stats.describe == "graph capture" and stats.pieces == ("graph capture",)
    # the warm-up stream and the capture happen on device 1, not on the current device 0
    assert npu.called("Stream")[0] == (1, 0)
    assert (1,) in npu.called("device.__enter__")
    assert len(npu.graphs) == 1 and npu.graphs[0].replays == 2


def test_npu_capture_failure_with_graphs_on_is_one_line_with_the_reason():
    with FakeNpu(device_count=1, capture_error=ACLOP_CAPTURE_ERROR):
        runner = fp.make_runner(Double(), fake_device(0), graphs="on")
        x = torch.ones(1, 3, 4, 4)
        runner(x)  # first sight: eager
        with pytest.raises(fp.FastPathError) as err:
            runner(x)
    message = str(err.value)
    assert message.startswith("--graphs on: graph capture failed for input 1x3x4x4 float32 (RuntimeError: "
                              "Cannot run aclop operators during NPU graph capture.")
    assert "\n" not in message and "--graphs auto" in message


def test_npu_capture_failure_with_graphs_auto_is_logged_once_and_reported():
    logged = []
    with FakeNpu(device_count=1, capture_error=ACLOP_CAPTURE_ERROR):
        runner = fp.make_runner(Double(), fake_device(0), graphs="auto", log=logged.append)
        for shape in [(1, 3, 4, 4)] * 4 + [(1, 3, 8, 8)] * 3:
            x = torch.full(shape, 2.0)
            assert torch.equal(runner(x), x * 2)  # eager, and right
        stats = runner.stats()
    assert len(logged) == 1 and "Cannot run aclop operators" in logged[0] and "running it eagerly" in logged[0]
    assert (stats.captures, stats.replays) == (0, 0)
    assert set(stats.capture_failures) == {"1x3x4x4 float32", "1x3x8x8 float32"}
    assert stats.capture_failures["1x3x4x4 float32"].startswith("RuntimeError: Cannot run aclop operators")
    assert runner.describe == "graph capture failed (eager)" and stats.to_dict()["describe"] == runner.describe


def test_a_failed_capture_begin_puts_the_stream_back():
    from fake_npu import TASK_QUEUE_CAPTURE_ERROR

    with FakeNpu(device_count=1, capture_error=TASK_QUEUE_CAPTURE_ERROR, capture_error_at="begin"):
        factory = fp.graph_factory(fake_device(0))
        with pytest.raises(RuntimeError, match="TASK_QUEUE_ENABLE = 2"):
            factory(_double, torch.ones(2))
        # torch_npu's graph.__exit__ never ran: without the fix the capture stream would stay current
        assert torch.npu.current_stream(0).stream_id == 0


@pytest.mark.parametrize("graphs", ["on", "auto"])
def test_task_queue_2_blocks_capture_before_anything_runs(monkeypatch, graphs):
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")
    logged = []
    with FakeNpu(device_count=1) as npu:
        if graphs == "on":
            with pytest.raises(fp.FastPathError, match="--graphs on: TASK_QUEUE_ENABLE=2.*export TASK_QUEUE_ENABLE=1"):
                fp.make_runner(Double(), fake_device(0), graphs=graphs)
            return
        runner = fp.make_runner(Double(), fake_device(0), graphs=graphs, log=logged.append)
        for _ in range(3):
            runner(torch.ones(2))
    assert runner.graphs is None and npu.graphs == [] and runner.describe == "eager"
    assert "TASK_QUEUE_ENABLE=2" in runner.stats().capture_blocked and "TASK_QUEUE_ENABLE=2" in logged[0]


def test_npu_without_npugraph_falls_back_to_the_accelerator_graph(monkeypatch):
    with FakeNpu(device_count=1):
        monkeypatch.delattr(torch.npu, "NPUGraph")
        factory = fp.graph_factory(fake_device(0))
    assert isinstance(factory, fp.AcceleratorGraphs) and factory.pool_kind == "shared"


def test_broken_torchair_is_one_line_naming_the_cause():
    missing = ModuleNotFoundError("No module named 'pkg_resources'")
    with FakeNpu(device_count=1, torchair_error=missing):
        with pytest.raises(fp.FastPathError) as err:
            fp.make_runner(Double(), fake_device(0), compile=True)
    message = str(err.value)
    assert "ModuleNotFoundError: No module named 'pkg_resources'" in message
    assert "setuptools<82" in message and "protobuf" in message and "\n" not in message
    assert err.value.__cause__ is None  # the lazy module's page of text stays out


def test_torchair_compiles_with_its_npu_backend():
    with FakeNpu(device_count=1) as npu:
        runner = fp.make_runner(TwoConvs().eval(), fake_device(0), compile=True, graphs="on")
        x = torch.randn(1, 3, 16, 16)
        out = runner(x)
        stats = runner.stats()
    assert torch.allclose(out, runner.compiled.fn._orig_mod(x), atol=1e-6)
    assert len(npu.called("torchair.get_npu_backend")) == 1 and npu.called("torchair.backend")
    assert stats.pieces == ("compiled",) and stats.compiled_now == 1 and runner.graphs is None


def test_a_failed_torchair_compilation_is_one_line():
    with FakeNpu(device_count=1) as npu:
        def failing_backend(gm, example_inputs):
            raise RuntimeError("GE compile failed\n" + "stack\n" * 50)

        npu.torchair.get_npu_backend = lambda **kw: failing_backend
        compiled = fp.compile_model(TwoConvs().eval(), fake_device(0))
        with pytest.raises(fp.FastPathError, match=r"^--compile: torchair compilation for input \(1, 3, 16, 16\) "
                                                   r"failed \(RuntimeError: GE compile failed\); run without --compile$"):
            compiled(torch.randn(1, 3, 16, 16))
