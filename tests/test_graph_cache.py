"""The graph cache under a real mix of shapes, with fakes that replay for real (tests/fake_replay.py: OpTape):
no thrashing, replay equal to eager for changing inputs and after eviction, a stale replay caught, prepared
shapes pinned and sealed, one pool and one capture stream per device, input errors kept input errors."""
from __future__ import annotations

import pytest
import torch

from modnet_npu.runtime import acceleration as fp
from fake_npu import FakeNpu, fake_device
from fake_replay import ReplayingFakeNpu, TapeGraphs


class TwoConvs(torch.nn.Module):
    """Real arithmetic on every element: a stale input or output changes the answer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.b(torch.relu(self.a(x))))


class Picky(TwoConvs):
    """Refuses odd widths, as MODNet refuses sides that are not multiples of 32."""

    def forward(self, x):
        if x.shape[-1] % 2:
            raise ValueError(f"width {x.shape[-1]} is odd")
        return super().forward(x)


SIX = [(1, 3, 8, 8), (2, 3, 8, 8), (1, 3, 16, 8), (4, 3, 8, 8), (1, 3, 8, 16), (2, 3, 16, 16)]


def _rotation(call, model, rounds=10):
    """``rounds`` rounds over SIX, a fresh random input at every call; every answer checked against eager."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(rounds):
        for shape in SIX:
            x = torch.randn(shape, generator=gen)
            with torch.inference_mode():
                want = model(x)
                got = call(x)
            assert torch.allclose(got, want, atol=1e-6, rtol=0), f"replay differs from eager at {shape}"


def test_six_shapes_in_rotation_capture_at_most_twelve_times():
    model, tape = TwoConvs().eval(), TapeGraphs()
    cache = fp.GraphCache(model, tape, max_graphs=4)
    _rotation(cache, model)
    n = cache.counts()
    # without the eviction back-off: 54 captures (every call after the first round of a shape evicted)
    assert n.captures <= 12 and n.captures == len(tape.shapes)
    assert n.recaptures == n.captures - len(SIX) and n.evictions == n.captures - n.held
    assert n.held == 4 and n.replays + n.eager_runs == 60 and n.replays > 30


def test_four_shapes_over_four_places_are_captured_once_each():
    model, tape = TwoConvs().eval(), TapeGraphs()
    cache = fp.GraphCache(model, tape, max_graphs=4)
    for _ in range(10):
        for shape in SIX[:4]:
            cache(torch.randn(shape))
    assert cache.captures == 4 and cache.evictions == 0 and (cache.eager_runs, cache.replays) == (4, 36)


def test_six_shapes_in_rotation_on_the_npu_fake_replay_equals_eager_with_one_pool():
    model = TwoConvs().eval()
    with ReplayingFakeNpu(device_count=1) as npu:
        runner = fp.make_runner(model, fake_device(0), graphs="on")
        _rotation(runner, model)
        stats = runner.stats()
        begins = npu.called("NPUGraph.capture_begin")
        streams = {id(args[2]) for args in npu.called("graph")}
    assert stats.captures <= 12 and stats.captures == len(begins)
    assert stats.evictions == stats.captures - 4 and stats.recaptures == stats.captures - 6
    assert stats.graph_pool == "shared" and stats.graphs_held == 4 and stats.max_graphs == 4
    pools = {args[0] for args in begins}
    assert len(pools) == 1 and None not in pools  # every graph allocated from the one pool of the device
    assert len(streams) == 1  # and was captured on the one capture stream of this runner's device
    d = stats.to_dict()
    assert {"recaptures", "evictions", "eager_runs", "graphs_held", "graph_pool"} <= set(d)


def test_a_replay_that_does_nothing_is_stale_and_the_honest_fake_catches_a_stale_input():
    """Why the fakes replay for real: with FakeNpu's no-op replay the second input gets the first answer."""
    model = TwoConvs().eval()
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    with FakeNpu(device_count=1):
        runner = fp.make_runner(model, fake_device(0), graphs="on")
        runner(a)
        runner(a)  # captured
        stale = runner(b)
    with torch.inference_mode():
        assert not torch.allclose(stale, model(b))  # a test feeding one input only would never see this
    with ReplayingFakeNpu(device_count=1):
        runner = fp.make_runner(model, fake_device(0), graphs="on")
        runner(a)
        runner(a)
        assert torch.allclose(runner(b), model(b), atol=1e-6)
        # break the cache on purpose: its static input no longer feeds the graph
        for entry in runner.graphs.graphs.values():
            entry.static_in = entry.static_in.clone()
        broken = runner(model_input := torch.randn(1, 3, 8, 8))
    with torch.inference_mode():
        assert not torch.allclose(broken, model(model_input))


def test_capture_streams_belong_to_each_device():
    """torch.cuda.graph's class-wide default stream belongs to the first device that captured: each runner
    passes its own device's stream instead, so npu:1 after npu:0 in one process captures on npu:1."""
    model = TwoConvs().eval()
    x = torch.randn(1, 3, 8, 8)
    with ReplayingFakeNpu(device_count=2) as npu:
        for index in (0, 1):
            runner = fp.make_runner(model, fake_device(index), graphs="on")
            runner.prepare(x)
        streams = [args[2] for args in npu.called("graph")]
    assert [s.device_index for s in streams] == [0, 1]


def test_prepared_shapes_are_pinned_and_sealing_stops_captures():
    model, tape, logged = TwoConvs().eval(), TapeGraphs(), []
    cache = fp.GraphCache(model, tape, max_graphs=1, log=logged.append)
    for shape in SIX[:3]:
        assert cache.prepare(torch.randn(shape))
    for _ in range(5):  # other shapes come and go through the one unpinned place
        for shape in SIX[3:]:
            cache(torch.randn(shape))
    assert {k[0] for k in cache.pinned} == set(SIX[:3]) and set(SIX[:3]) <= {k[0] for k in cache.graphs}
    before = cache.captures
    cache.seal()
    new_shape = (8, 3, 8, 8)
    for _ in range(4):
        x = torch.randn(new_shape)
        assert torch.allclose(cache(x), model(x), atol=1e-6)
    assert cache.captures == before and new_shape not in tape.shapes[before:]
    outside = [m for m in logged if "outside the prepared shape set" in m]
    assert len(outside) == 1 and "8x3x8x8 float32" in outside[0]
    assert cache.prepared_batches((3, 8, 8), torch.float32) >= {1, 2}


def test_a_bad_input_under_graphs_on_is_the_input_error():
    cache = fp.GraphCache(Picky().eval(), TapeGraphs(), capture_after=1, strict=True)
    with pytest.raises(ValueError, match="width 9 is odd"):
        cache(torch.randn(1, 3, 8, 9))
    assert cache.failed == {} and cache.captures == 0


def test_a_failed_capture_with_graphs_auto_answers_from_the_eager_run():
    model, logged = TwoConvs().eval(), []
    cache = fp.GraphCache(model, TapeGraphs(fail_for=((1, 3, 8, 8),)), capture_after=1, log=logged.append)
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(cache(x), model(x)) and cache.eager_runs == 1 and len(logged) == 1


def test_batch_set():
    assert fp.batch_set(8) == (1, 2, 4, 8) and fp.batch_set(1) == (1,)
    assert fp.batch_set(3) == (1, 2, 3) and fp.batch_set(64) == (1, 2, 4, 8)
    with pytest.raises(ValueError):
        fp.batch_set(0)
