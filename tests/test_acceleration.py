"""Graph-capture bookkeeping and the CPU batch path, on the CPU; real capture on CUDA when present."""
from __future__ import annotations

import copy

import pytest
import torch

import acceleration as fp
from inference_form import optimize


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


def test_compiled_package_is_cached_and_reused(seeded_model, tmp_path):
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("AOTInductor needs a C++ compiler")
    fast = optimize(copy.deepcopy(seeded_model))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = fast(x)
    first = fp.compile_model(fast, torch.device("cpu"), str(tmp_path))
    with torch.inference_mode():
        out = first(x)
    assert first.compiled_now == 1 and float((out - ref).abs().max()) <= 1e-4
    packages = list(tmp_path.glob("modnet-*-cpu-1x3x64x64-float32-*.pt2"))
    assert len(packages) == 1
    # a new process would find the package: no second compilation
    second = fp.compile_model(fast, torch.device("cpu"), str(tmp_path))
    with torch.inference_mode():
        again = second(x)
    assert second.compiled_now == 0 and second.from_cache == 1
    assert torch.allclose(again, out, atol=1e-6)
    # other weights, other package
    other = optimize(copy.deepcopy(seeded_model))
    with torch.no_grad():
        other.conv_f[1].conv.bias.add_(1.0)
    assert fp.weights_digest(other) != fp.weights_digest(fast)


def test_compile_refuses_mps():
    with pytest.raises(fp.FastPathError, match="not supported on mps"):
        fp.compile_model(torch.nn.Identity(), torch.device("mps"))
