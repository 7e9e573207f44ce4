from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

from modnet_npu.model.optimized import optimize, with_precision
from modnet_npu.graph.analysis import count_ops


@pytest.fixture(scope="module")
def fast(seeded_model):  # the optimized form
    return optimize(copy.deepcopy(seeded_model))


def test_fewer_operators_than_the_faithful_model(seeded_model, fast):
    x = torch.randn(1, 3, 256, 256)
    total_f, kernels_f, _ = count_ops(seeded_model, x)
    total_o, kernels_o, ops = count_ops(fast, x)
    assert kernels_o <= 0.75 * kernels_f and total_o <= 0.75 * total_f
    assert "batch_norm" not in ops and ops["conv2d"] == 69
    assert ops["cat"] == 6  # only the branch joins remain; IBNorm's slice/cat copies are gone


def test_matches_onnxruntime(webnn_file, fast, portrait_input):
    sess = ort.InferenceSession(webnn_file, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": portrait_input})[0]
    with torch.no_grad():
        ours = fast(torch.from_numpy(portrait_input)).numpy()
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("shape", [(2, 3, 320, 480), (4, 3, 64, 64)])
def test_same_function_as_faithful_at_any_size(seeded_model, fast, shape):
    x = torch.randn(shape)
    with torch.no_grad():
        assert float((fast(x) - seeded_model(x)).abs().max()) <= 1e-4


def test_does_not_modify_its_input(fast):
    x = torch.randn(1, 3, 64, 64)
    before = x.clone()
    with torch.no_grad():
        fast(x)
    assert torch.equal(x, before)


def test_runs_on_meta(fast):
    meta = copy.deepcopy(fast).to("meta")
    assert meta(torch.empty(2, 3, 96, 64, device="meta")).shape == (2, 1, 96, 64)


@pytest.mark.parametrize("precision,mae", [("fp16", 2e-3), ("bf16", 1e-2)])
def test_half_precision_stays_close(fast, portrait_input, precision, mae):
    x = torch.from_numpy(portrait_input)
    with torch.no_grad():
        ref = fast(x)
        half, in_dtype = with_precision(copy.deepcopy(fast), precision)
        try:
            out = half(x.to(in_dtype))
        except RuntimeError as exc:  # some CPU builds lack a half kernel
            pytest.skip(f"{precision} not supported on this CPU build: {exc}")
    assert out.dtype != torch.float32  # the decoder really ran in half precision
    convs = [m.weight for m in half.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # oneDNN's layout on a CPU
    out = out.float()
    assert torch.isfinite(out).all()
    assert float((out - ref).abs().mean()) <= mae


def test_the_optimized_model_owns_its_modules(seeded_model):
    """Casting or changing the optimized model leaves the faithful one as it was (the SE block's Linears included)."""
    faithful = copy.deepcopy(seeded_model)
    before = {k: v.clone() for k, v in faithful.state_dict().items()}
    optimized = optimize(faithful)
    ours = {p.data_ptr() for p in faithful.parameters()} | {b.data_ptr() for b in faithful.buffers()}
    assert not ours & {p.data_ptr() for p in optimized.parameters()}
    optimized.half()
    with torch.no_grad():
        for p in optimized.parameters():
            p.fill_(1)
    after = faithful.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_modules_are_told_apart_by_type_not_name():
    import inspect

    from modnet_npu.model import optimized

    assert "__name__" not in inspect.getsource(optimized)
