"""``inference.py --ray``: the local path's outputs, errors and resume, on a local Ray.

Placement and argument checks need no Ray. The rest runs on one Ray session
for the module (started like the CLI starts one, ~8 s on two cores, in a short
temporary folder: Ray's socket paths must stay under ~107 characters); the
first Ray test starts and stops its own through the CLI, before that session
exists. Every Ray session must leave no Ray process behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import inference
from modnet_npu.matting import scaleout
from modnet_npu.runtime.options import EngineOptions
from conftest import PORTRAIT, ROOT, make_video

# Ray Data sets its deprecated options on every copy of its context: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
MODES = ("matte", "cutout", "composite")


# --------------------------------------------------------------------------
# no Ray needed
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device,cluster,nodes,actors,expect", [
    ("auto", "auto", {"CPU": 8}, 1, None, ("ort", "cpu", 1, 0, {})),
    ("auto", "auto", {"CPU": 192, "NPU": 8}, 1, None, ("torch", "npu", 8, 24, {"resources": {"NPU": 1}})),
    ("auto", "auto", {"CPU": 128, "NPU": 16}, 2, None, ("torch", "npu", 16, 8, {"resources": {"NPU": 1}})),
    ("torch", "cuda:1", {"CPU": 32, "GPU": 4}, 1, None, ("torch", "cuda", 4, 8, {"num_gpus": 1})),
    ("torch", "cpu", {"CPU": 2}, 1, 2, ("torch", "cpu", 2, 1, {})),
    ("auto", "cpu", {"CPU": 64}, 4, None, ("torch", "cpu", 4, 0, {})),
])
def test_placement_follows_the_cluster(backend, device, cluster, nodes, actors, expect):
    p = scaleout.place(backend=backend, device=device, precision="fp32", cluster=cluster, nodes=nodes, actors=actors)
    assert (p.backend, p.device, p.actors, p.threads, p.ray_args) == expect


@pytest.mark.parametrize("backend,device,precision,cluster,actors,error,expect", [
    ("torch", "cuda", "fp32", {"CPU": 2}, None, scaleout.ScaleoutError, "has no GPU"),
    ("auto", "npu", "fp32", {"CPU": 8, "GPU": 1}, None, scaleout.ScaleoutError, "has no NPU"),
    ("torch", "cuda", "fp32", {"CPU": 8, "GPU": 2}, 4, scaleout.ScaleoutError, "cluster has 2"),
    ("torch", "cpu", "fp32", {"CPU": 2}, 3, scaleout.ScaleoutError, "reserve every CPU"),
    ("ort", "cuda", "fp32", {"CPU": 8, "GPU": 1}, None, ValueError, "ort backend runs on the CPU"),
    ("ort", "cpu", "fp16", {"CPU": 8}, None, ValueError, "needs --backend torch"),
    ("torch", "tpu", "fp32", {"CPU": 8}, None, ValueError, "unknown device"),
])
def test_placement_refuses_what_would_hang_or_cannot_run(backend, device, precision, cluster, actors, error, expect):
    with pytest.raises(error, match=expect):
        scaleout.place(backend=backend, device=device, precision=precision, cluster=cluster, actors=actors)


@pytest.mark.parametrize("args,expect", [
    (["-", "--mode", "matte", "--ray"], "- (stdin) runs here"),
    (["--ray", "{src}", "-o", "{out}"], "took"),
    (["{src}", "-o", "{out}", "--ray=cluster-7"], "not a Ray address"),
])
def test_ray_usage_errors_are_one_line(args, expect, tmp_path, capsys):
    args = [a.format(src=tmp_path, out=tmp_path / "o") for a in args]
    assert inference.main([*args, str(tmp_path)] if "took" in expect else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err


def _every_option_changed(model: str, models_dir: str) -> EngineOptions:
    """Engine options with every field away from its default (checked: a new field must be added here)."""
    given = EngineOptions(model=model, sha256=hashlib.sha256(Path(model).read_bytes()).hexdigest(),
                          models_dir=models_dir, offline=True, allow_synthetic=True, backend="torch", device="cpu",
                          precision="bf16", model_form="faithful", size=(64, 96), max_side=5000, threads=1,
                          compile=True, graphs="off", strict_fp32=True)
    default = EngineOptions()
    assert [f.name for f in fields(EngineOptions) if getattr(given, f.name) == getattr(default, f.name)] == []
    return given


def test_the_actor_opens_its_matter_with_the_options_whole(monkeypatch, tmp_path, webnn_file):
    from modnet_npu.matting import matter as matting
    from modnet_npu.runtime import process_setup

    opened = []
    monkeypatch.setattr(matting, "Matter", lambda options, **kw: opened.append((options, kw)) or object())
    monkeypatch.setattr(process_setup, "setup_process", lambda **kw: SimpleNamespace(threads=3))
    given = _every_option_changed(webnn_file, str(tmp_path))
    actor = scaleout._ImageActor(given)
    [(options, kw)] = opened
    assert kw == {"validate": False} and actor.options is given
    for f in fields(EngineOptions):  # every field, so that a new one cannot be forgotten
        want = 3 if f.name == "threads" else getattr(given, f.name)  # the threads the actor's process set up
        assert getattr(options, f.name) == want, f.name


def test_actors_get_the_options_whole_but_what_the_placement_chose(webnn_file, tmp_path):
    given = _every_option_changed(webnn_file, str(tmp_path))
    placement = scaleout.place(backend="auto", device="auto", precision="fp32", cluster={"CPU": 64, "NPU": 8})
    sent = scaleout.actor_options(given, placement)
    chosen = {"backend": "torch", "device": "npu", "threads": 8}
    for f in fields(EngineOptions):
        assert getattr(sent, f.name) == chosen.get(f.name, getattr(given, f.name)), f.name


def _not_modnet(path: Path) -> None:
    """A valid ONNX file with MODNet's input and output that is not MODNet (one 1x1 convolution): the graph
    analysis alone accepts it, the conversion does not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "h", "w"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, "h", "w"])
    w = numpy_helper.from_array(np.full((1, 3, 1, 1), 0.1, np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"]), helper.make_node("Sigmoid", ["c"], ["output"])]
    graph = helper.make_graph(nodes, "not_modnet", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_ray_refuses_the_model_files_the_local_path_refuses(tmp_path):
    pytest.importorskip("ray.data")
    model = tmp_path / "model.onnx"
    _not_modnet(model)
    seen = []
    for where in ([], ["--ray"]):
        out = tmp_path / f"out{len(where)}"
        code, err, _ = _cli([str(PORTRAIT), "-o", str(out), "--model", str(model), "--backend", "ort", "--quiet",
                             *where])
        seen.append((code, err.replace(str(out), "OUT")))
        assert not out.exists()
    assert seen[0] == seen[1] and seen[0][0] == 1 and "not a MODNet graph" in seen[0][1], seen


def test_without_ray_installed_the_error_says_how_to_install(tmp_path, capsys, monkeypatch, webnn_file):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    code = inference.main([str(PORTRAIT), "-o", str(tmp_path), "--model", webnn_file, "--ray"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "pip install -r requirements-ray.txt" in err


# --------------------------------------------------------------------------
# warm-up: the driver plans the shapes from the headers, each actor prepares them before its first batch
# (the actor classes called here directly, without Ray; graph capture through tests/fake_replay.py)
# --------------------------------------------------------------------------


def _photos(src: Path, sizes: list[tuple[int, int]]) -> None:
    src.mkdir()
    for i, size in enumerate(sizes):
        Image.open(PORTRAIT).resize(size).save(src / f"p{i}.png")


def _cpu_placement() -> scaleout.Placement:
    return scaleout.place(backend="torch", device="cpu", precision="fp32", cluster={"CPU": 4})


@pytest.fixture
def captured_actor(monkeypatch):
    """Actors built in this process: graph capture on the CPU through the replaying stand-in, and the
    process-wide setup (threads, allocator) left alone."""
    from fake_replay import TapeGraphs
    from modnet_npu.runtime import acceleration, process_setup

    monkeypatch.setattr(acceleration, "graph_factory", lambda device: TapeGraphs())
    monkeypatch.setattr(process_setup, "setup_process", lambda **kw: SimpleNamespace(threads=1))


def test_the_driver_plans_the_shapes_of_each_stage_from_the_headers(tmp_path):
    from modnet_npu.matting import warmup
    from modnet_npu.matting.imaging import ShortSide
    from modnet_npu.matting.jobs import plan_jobs

    _photos(tmp_path / "in", [(96, 64), (96, 64), (64, 64)])
    make_video(tmp_path / "in" / "clip.mp4", frames=5)
    jobs = plan_jobs([str(tmp_path / "in")], str(tmp_path / "out"), ["matte"], "png", False).jobs
    options = EngineOptions(model="m.onnx", backend="torch", device="cpu", size=ShortSide(64), graphs="on")
    plans = scaleout.shape_plans(jobs, options, _cpu_placement(), batch=4)
    assert plans == {"image": warmup.ShapePlan(((64, 96), (64, 64)), 2), "video": warmup.ShapePlan(((64, 96),), 4)}
    ort = scaleout.place(backend="ort", device="cpu", precision="fp32", cluster={"CPU": 4})
    assert scaleout.shape_plans(jobs, options, ort, batch=4) == {"image": None, "video": None}  # nothing per shape


def _decoded(src: Path) -> dict[str, np.ndarray]:
    """A batch as the decode stage hands it to the inference actors."""
    from modnet_npu.matting.jobs import plan_jobs

    jobs = plan_jobs([str(src)], str(src.parent / "out"), ["matte"], "png", False).jobs
    rows = [scaleout._decode(scaleout._row(job)) for job in jobs]
    return {k: scaleout._objects([r[k] for r in rows]) for k in rows[0]}


def test_the_image_actor_prepares_its_shapes_before_its_first_batch(tmp_path, captured_actor, flavour_files):
    from modnet_npu.matting.imaging import ShortSide
    from modnet_npu.matting.jobs import plan_jobs

    _photos(tmp_path / "in", [(96, 64), (96, 64), (64, 64)])
    options = EngineOptions(model=flavour_files["official"], backend="torch", device="cpu", size=ShortSide(64),
                            graphs="on", threads=1)
    jobs = plan_jobs([str(tmp_path / "in")], str(tmp_path / "out"), ["matte"], "png", False).jobs
    plan = scaleout.shape_plans(jobs, options, _cpu_placement(), batch=4)["image"]
    actor = scaleout._ImageActor(options, warm=plan)
    ready = actor.matter.engine.fast_path_stats()  # after the constructor, before any batch
    shapes = {f"{b}x3x{h}x{w} float32" for h, w in ((64, 96), (64, 64)) for b in (1, 2)}
    assert ready.sealed and {p.shape for p in ready.prepared} == shapes and ready.captures == len(shapes)
    assert actor.note.startswith("batches 1,2 at 64x96, 64x64 prepared (")
    note = actor.note
    first = actor(_decoded(tmp_path / "in"))
    again = actor(_decoded(tmp_path / "in"))
    after = actor.matter.engine.fast_path_stats()
    assert after.captures == ready.captures and after.outside_set == () and after.replays >= ready.replays + 4
    assert list(first["note"]) == [note, "", ""] and list(again["note"]) == ["", "", ""]  # said once
    assert [a.shape for a in first["alpha"]] == [(64, 96), (64, 96), (64, 64)] and not any(first["error"])


def test_the_video_actor_prepares_the_frame_size_before_its_first_frame(tmp_path, captured_actor, flavour_files):
    from modnet_npu.matting.imaging import ShortSide
    from modnet_npu.matting.jobs import plan_jobs

    (tmp_path / "in").mkdir()
    make_video(tmp_path / "in" / "clip.mp4", frames=5)
    options = EngineOptions(model=flavour_files["official"], backend="torch", device="cpu", size=ShortSide(64),
                            graphs="on", threads=1)
    jobs = plan_jobs([str(tmp_path / "in")], str(tmp_path / "out"), ["matte"], "png", False).jobs
    plan = scaleout.shape_plans(jobs, options, _cpu_placement(), batch=2)["video"]
    actor = scaleout._VideoActor(options, background="white", batch=2, temporal=False, warm=plan)
    ready = actor.matter.engine.fast_path_stats()
    assert ready.sealed and [p.shape for p in ready.prepared] == ["1x3x64x96 float32", "2x3x64x96 float32"]
    rows = [scaleout._row(job) for job in jobs]
    out = actor({k: scaleout._objects([r[k] for r in rows]) for k in ("source", "path", "outputs")})
    after = actor.matter.engine.fast_path_stats()
    assert list(out["frames"]) == [5] and list(out["error"]) == [""]
    assert out["note"][0].startswith("batches 1,2 at 64x96")
    assert after.captures == ready.captures == 2 and after.outside_set == () and after.replays == ready.replays + 3


# --------------------------------------------------------------------------
# on Ray
# --------------------------------------------------------------------------


def _ray_processes(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if marker in line]


def _assert_no_ray_left(marker: str, wait_s: float = 15.0) -> None:
    deadline = time.monotonic() + wait_s
    while _ray_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not _ray_processes(marker), "Ray processes left behind"


def _cli(args: list[str]) -> tuple[int, str, float]:
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        code = inference.main(args)
    return code, err.getvalue(), time.perf_counter() - start


def test_missing_device_fails_fast_and_the_local_ray_is_shut_down(tmp_path, monkeypatch, flavour_files):
    """The CLI starts its own Ray (no ADDRESS), finds no GPU, says so, and stops it; under 30 s."""
    pytest.importorskip("ray.data")
    import ray

    assert not ray.is_initialized(), "this test must run before the module's Ray session starts"
    short = tempfile.mkdtemp(prefix="sxt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", short)  # Ray's own default folder, moved: short, and known to find its processes
    try:
        code, err, seconds = _cli([str(PORTRAIT), "-o", str(tmp_path / "o"), "--model", flavour_files["official"],
                                   "--backend", "torch", "--device", "cuda", "--ray"])
        assert code == 1 and seconds < 30, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "the Ray cluster has no GPU" in errors[0]
        assert "Traceback" not in err and not ray.is_initialized()
        _assert_no_ray_left(short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module: two CPUs, a small object store, no dashboard, usage stats off."""
    pytest.importorskip("ray.data")
    short = tempfile.mkdtemp(prefix="sxt", dir="/tmp")
    try:
        with scaleout.ray_session(None, local=scaleout.LocalRay(num_cpus=2, object_store_mb=160, temp_dir=short)):
            yield short
        _assert_no_ray_left(short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _inputs(src: Path) -> None:
    """30 photos of mixed sizes (48..160 px, some sharing one), 2 corrupt files and a short video."""
    base = Image.open(PORTRAIT)
    rng = np.random.default_rng(7)
    for i in range(30):
        w, h = (96, 64) if i % 5 == 0 else (int(rng.integers(48, 161)), int(rng.integers(48, 161)))
        img = base.resize((w, h)).rotate(7 * i)
        img.save(src / (f"p{i:02d}.png" if i % 3 else f"p{i:02d}.jpg"))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (src / "notapng.png").write_bytes(b"plain text")
    make_video(src / "clip.mp4", frames=10, fps=20, shift=4)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory, flavour_files):
    """The same job through the local path (here) and through --ray (a fresh process joining the cluster)."""
    import ray

    root = tmp_path_factory.mktemp("scaleout")
    src = root / "in"
    src.mkdir()
    _inputs(src)
    common = [str(src), "--model", flavour_files["official"], "--size", "64", "--backend", "torch", "--device", "cpu",
              "--batch", "4", "--background", "#00ff00", *[a for m in MODES for a in ("--mode", m)]]
    local = _cli([*common, "-o", str(root / "local")])
    # a process of its own: its whole stderr is seen, Ray's C++ core and log handlers included
    address = ray.get_runtime_context().gcs_address
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), *common, "-o", str(root / "ray"),
                           "--ray", address], capture_output=True, text=True, timeout=300)
    ray_run = (proc.returncode, proc.stderr + proc.stdout, time.perf_counter() - start)
    return SimpleNamespace(root=root, common=common, local=local, ray=ray_run)


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_ray_writes_what_the_local_path_writes(runs):
    local, ray = runs.root / "local", runs.root / "ray"
    assert set(_files(ray)) == set(_files(local)) and len(_files(ray)) == 30 * 3 + 3
    for name in _files(local):
        if name.endswith(".mp4") or name.endswith(".mov"):
            continue
        a, b = np.asarray(Image.open(local / name)), np.asarray(Image.open(ray / name))
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1, name


def test_corrupt_files_are_one_error_line_each_and_exit_1(runs):
    for code, err, _ in (runs.local, runs.ray):
        errors = sorted(line for line in err.splitlines() if line.startswith("error:"))
        assert code == 1 and len(errors) == 2, err
        assert "broken.jpg" in errors[0] and "notapng.png" in errors[1]
        assert "31 succeeded, 2 failed, 0 skipped" in err and "images/s" in err


def test_ray_is_quiet(runs):
    """Our lines only: no Ray log line, warning or traceback on the way."""
    ours = ("error: ", "ray: ", "done: ", "backend ")
    assert [line for line in runs.ray[1].splitlines() if not line.startswith(ours)] == []


def test_video_on_ray_keeps_frames_and_audio(runs):
    import av

    for name in ("clip_matte.mp4", "clip_cutout.mov", "clip_composite.mp4"):
        seen = []
        for folder in ("local", "ray"):
            with av.open(str(runs.root / folder / name)) as c:
                seen.append((len(list(c.decode(video=0))), len(c.streams.audio), c.streams.video[0].average_rate))
        assert seen[0] == seen[1] == (10, 1, 20), name


def test_a_second_run_writes_nothing_new(runs):
    before = _files(runs.root / "ray")
    code, err, _ = _cli([*runs.common, "-o", str(runs.root / "ray"), "--ray", "auto"])
    assert code == 1 and "0 succeeded, 2 failed, 31 skipped" in err  # the corrupt files are tried again
    assert "actor" not in err  # ... by the driver: their headers do not read, and no worker is started for them
    assert sorted(ln for ln in err.splitlines() if ln.startswith("error:")) == \
        sorted(ln for ln in runs.local[1].splitlines() if ln.startswith("error:"))  # in the local path's words
    rate = float(re.search(r"([0-9.]+) images/s", err.rsplit("done:", 1)[1]).group(1))
    assert rate < 1e5  # the time of the driver's check, not of nothing (2e9 images/s were printed)
    assert _files(runs.root / "ray") == before


def test_missing_device_on_a_running_cluster_fails_fast(cluster, tmp_path, flavour_files):
    code, err, seconds = _cli([str(PORTRAIT), "-o", str(tmp_path), "--model", flavour_files["official"],
                               "--device", "npu", "--ray", "auto"])
    assert code == 1 and seconds < 30 and "the Ray cluster has no NPU" in err and err.count("error:") == 1


def test_a_broken_model_is_one_error_line_before_any_actor_starts(cluster, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    code, err, seconds = _cli([str(PORTRAIT), "-o", str(tmp_path / "o"), "--model", str(bad), "--device", "cpu",
                               "--ray", "auto"])
    assert code == 1 and err.count("\n") == 1 and "not a readable ONNX file" in err and seconds < 5, err
    assert not (tmp_path / "o").exists()


class _DiesOnce(scaleout._ImageActor):
    """An inference actor whose process dies in its first batch (a crash, an OOM kill)."""

    marker = ""

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


def test_an_actor_that_dies_is_replaced_and_its_batch_retried(cluster, tmp_path, monkeypatch, flavour_files):
    import ray.cloudpickle

    from modnet_npu.matting.imaging import ShortSide
    from modnet_npu.matting.jobs import plan_jobs

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test module
    monkeypatch.setattr(_DiesOnce, "marker", str(tmp_path / "died"))
    monkeypatch.setattr(scaleout, "_ImageActor", _DiesOnce)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.open(PORTRAIT).resize((64 + 16 * i, 64)).save(src / f"p{i}.jpg")
    jobs = plan_jobs([str(src)], str(tmp_path / "out"), ["matte"], "png", False).jobs
    try:
        summary = scaleout.run_on_ray(jobs, options=EngineOptions(model=flavour_files["official"], backend="torch",
                                                                  device="cpu", size=ShortSide(64)), batch=2)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(module)
    assert (tmp_path / "died").exists() and (summary.succeeded, summary.failed) == (3, 0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"p{i}_matte.png" for i in range(3)]


class _FlatMatter:
    """Mattes of 0.5: what the reporting actor infers with (its options' compile and bf16 would take minutes)."""

    def mattes(self, images):
        return [np.full(rgb.shape[:2], 0.5, np.float32) for rgb in images]

    def model_size(self, height, width):
        return height, width  # every image is of a size it takes


class _Reports(scaleout._ImageActor):
    """An inference actor that writes down the options it received, then mattes flat."""

    folder = ""

    def __init__(self, options, **kwargs):  # kwargs: the warm-up's plan (its own tests see it used)
        Path(self.folder, f"{os.getpid()}-{id(self)}.pkl").write_bytes(pickle.dumps(options))
        self.matter = _FlatMatter()


def test_every_engine_option_reaches_the_actors(cluster, tmp_path, monkeypatch, flavour_files):
    import ray.cloudpickle

    from modnet_npu.matting.jobs import plan_jobs

    given = _every_option_changed(flavour_files["official"], str(tmp_path / "models"))
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test module
    (tmp_path / "seen").mkdir()
    monkeypatch.setattr(_Reports, "folder", str(tmp_path / "seen"))
    monkeypatch.setattr(scaleout, "_ImageActor", _Reports)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        Image.open(PORTRAIT).resize((64 + 32 * i, 64)).save(src / f"p{i}.jpg")
    jobs = plan_jobs([str(src)], str(tmp_path / "out"), ["matte"], "png", False).jobs
    try:
        summary = scaleout.run_on_ray(jobs, options=given, batch=2)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(module)
    assert (summary.succeeded, summary.failed) == (2, 0)
    received = [pickle.loads(p.read_bytes()) for p in (tmp_path / "seen").iterdir()]
    assert received
    for options in received:
        for f in fields(EngineOptions):  # field by field: a field the driver drops fails here by name
            assert getattr(options, f.name) == getattr(given, f.name), f.name


def test_a_wide_image_under_a_raised_max_side_runs_alike_with_and_without_ray(cluster, tmp_path, flavour_files):
    """``--size 32x4160 --max-side 5000``: the actors used to get the default 4096 and refuse the image."""
    wide = tmp_path / "wide.png"
    Image.open(PORTRAIT).resize((2080, 48)).save(wide)
    args = [str(wide), "--model", flavour_files["official"], "--size", "32x4160", "--max-side", "5000",
            "--backend", "torch", "--device", "cpu", "--mode", "matte"]
    local = _cli([*args, "-o", str(tmp_path / "local")])
    on_ray = _cli([*args, "-o", str(tmp_path / "ray"), "--ray", "auto"])
    assert local[0] == on_ray[0] == 0, (local[1], on_ray[1])
    a = np.asarray(Image.open(tmp_path / "local" / "wide_matte.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "ray" / "wide_matte.png")).astype(int)
    assert a.shape == b.shape == (48, 2080) and np.abs(a - b).max() <= 1


class _Recomputes:
    """A graph factory for CPU tensors (``acceleration.GraphFactory``) small enough to send to a Ray worker:
    the capture runs the forward into a static output, a replay runs it again on the static input."""

    pool_kind = "shared"

    def __call__(self, fn, static_in):
        from modnet_npu.runtime.graphs import Captured

        out = fn(static_in)
        return Captured(static_in, out, lambda: out.copy_(fn(static_in)))


class _Counts(scaleout._ImageActor):
    """An inference actor with graph capture on the CPU that writes down its fast path's counters as each of
    its batches starts and ends."""

    folder = ""

    def __init__(self, options, **kwargs):
        from modnet_npu.runtime import acceleration

        real = acceleration.graph_factory
        acceleration.graph_factory = lambda device: _Recomputes()
        try:
            super().__init__(options, **kwargs)
        finally:
            acceleration.graph_factory = real
        self.ready = self.matter.engine.fast_path_stats()

    def __call__(self, batch):
        before = self.matter.engine.fast_path_stats()
        out = super().__call__(batch)
        after = self.matter.engine.fast_path_stats()
        record = (len(batch["source"]), self.ready, before, after)
        Path(self.folder, f"{os.getpid()}-{time.monotonic_ns()}.pkl").write_bytes(pickle.dumps(record))
        return out


def test_ray_actors_prepare_their_shapes_before_their_first_batch(cluster, tmp_path, monkeypatch, flavour_files):
    """The driver's plan reaches the actors, each prepares it in its constructor and says so once; no batch
    captures anything."""
    import ray.cloudpickle

    from modnet_npu.matting.imaging import ShortSide
    from modnet_npu.matting.jobs import plan_jobs

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test module
    (tmp_path / "seen").mkdir()
    monkeypatch.setattr(_Counts, "folder", str(tmp_path / "seen"))
    monkeypatch.setattr(scaleout, "_ImageActor", _Counts)
    _photos(tmp_path / "in", [(96, 64), (96, 64), (96, 64), (64, 64), (64, 64)])
    jobs = plan_jobs([str(tmp_path / "in")], str(tmp_path / "out"), ["matte"], "png", False).jobs
    options = EngineOptions(model=flavour_files["official"], backend="torch", device="cpu", size=ShortSide(64),
                            graphs="on", threads=1)
    logged = []
    try:
        summary = scaleout.run_on_ray(jobs, options=options, batch=2, log=logged.append)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(module)
    assert (summary.succeeded, summary.failed) == (5, 0)
    warm = [line for line in logged if "warm-up" in line]
    assert len(warm) == 1, logged
    assert warm[0].startswith("ray: image actor warm-up: batches 1,2 at 64x96, 64x64 prepared ("), logged
    records = [pickle.loads(p.read_bytes()) for p in (tmp_path / "seen").iterdir()]
    shapes = {f"{b}x3x{h}x{w} float32" for h, w in ((64, 96), (64, 64)) for b in (1, 2)}
    assert sum(r[0] for r in records) == 5 and max(r[0] for r in records) <= 2  # five images, batches of two
    for _, ready, before, after in records:
        assert ready.sealed and {p.shape for p in ready.prepared} == shapes
        assert ready.captures == before.captures == after.captures == len(shapes) and after.outside_set == ()
