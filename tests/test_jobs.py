"""Planning and running jobs without a model: a stand-in Matter returns flat mattes."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from modnet_npu.matting import jobs
from modnet_npu.matting.imaging import MAX_MODEL_SIDE, ShortSide, input_size


SHORT_64 = ShortSide(64)


class FlatMatter:
    """What jobs needs of a Matter: model_size (with the real size rule) and mattes."""

    def __init__(self, size=SHORT_64) -> None:
        self.size = size
        self.calls = 0

    def model_size(self, height: int, width: int):
        return input_size(self.size, height, width)

    def mattes(self, images):
        self.calls += 1
        return [np.full(rgb.shape[:2], 0.5, np.float32) for rgb in images]


def _photo(path, size=(40, 30)) -> None:
    Image.new("RGB", size, (200, 100, 50)).save(path)


def test_still_to_do_decides_per_output_file(tmp_path):
    job = jobs.Job("a.jpg", "image", {"matte": str(tmp_path / "a_matte.png"), "cutout": str(tmp_path / "a_cutout.png")})
    assert jobs.still_to_do(job, overwrite=False).outputs == job.outputs  # nothing there yet
    (tmp_path / "a_matte.png").write_bytes(b"done")
    pending = jobs.still_to_do(job, overwrite=False)
    assert pending.outputs == {"cutout": str(tmp_path / "a_cutout.png")}  # only the missing one
    assert job.outputs.keys() == {"matte", "cutout"}  # the planned job itself is unchanged
    (tmp_path / "a_cutout.png").write_bytes(b"done")
    assert jobs.still_to_do(job, overwrite=False) is None
    assert jobs.still_to_do(job, overwrite=True).outputs == job.outputs


def test_output_folder_that_is_the_input_folder_reads_only_the_inputs(tmp_path):
    _photo(tmp_path / "a.jpg")
    _photo(tmp_path / "a_matte.png")  # written by an earlier run
    _photo(tmp_path / "b_cutout.webp")
    _photo(tmp_path / ".a_cutout.k3j_a9zq.part.png")  # left by a killed run
    plan = jobs.plan_jobs([str(tmp_path)], str(tmp_path), ["matte", "cutout"], "png", recursive=False)
    assert [j.source for j in plan.jobs] == [str(tmp_path / "a.jpg")]
    assert sorted(os.path.basename(p) for p in plan.excluded) == [
        ".a_cutout.k3j_a9zq.part.png", "a_matte.png", "b_cutout.webp"]
    assert plan.jobs[0].outputs == {"matte": str(tmp_path / "a_matte.png"), "cutout": str(tmp_path / "a_cutout.png")}


def test_names_like_outputs_outside_the_output_folder_are_inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _photo(src / "holiday_cutout.png")  # the user's own file, in a folder we never write
    plan = jobs.plan_jobs([str(src)], str(tmp_path / "out"), ["matte"], "png", recursive=False)
    assert [os.path.basename(j.source) for j in plan.jobs] == ["holiday_cutout.png"] and plan.excluded == []


def test_output_folder_inside_the_input_is_not_walked(tmp_path):
    _photo(tmp_path / "a.jpg")
    out = tmp_path / "out"
    (out / "deeper").mkdir(parents=True)
    _photo(out / "x.jpg")
    _photo(out / "deeper" / "y.jpg")
    plan = jobs.plan_jobs([str(tmp_path)], str(out), ["matte"], "jpg", recursive=True)
    assert [os.path.basename(j.source) for j in plan.jobs] == ["a.jpg"]


def test_missing_inputs_and_stem_collisions(tmp_path):
    _photo(tmp_path / "p.jpg")
    _photo(tmp_path / "p.png")
    plan = jobs.plan_jobs([str(tmp_path), str(tmp_path / "nope.jpg")], str(tmp_path / "o"), ["cutout"], "jpg", False)
    assert plan.errors == [f"{tmp_path / 'nope.jpg'}: no such file or folder"]
    # cutouts stay PNG when JPEG is asked (no alpha in JPEG); the shared stem keeps its extension
    assert sorted(os.path.basename(j.outputs["cutout"]) for j in plan.jobs) == ["p_jpg_cutout.png", "p_png_cutout.png"]


def _plan(inputs, out, recursive=False, modes=("matte",)):
    return jobs.plan_jobs([str(i) for i in inputs], str(out), list(modes), "png", recursive)


def _outputs(plan) -> dict[str, str]:
    return {os.path.basename(j.source): os.path.basename(j.outputs["matte"]) for j in plan.jobs}


def test_one_stem_from_two_folders_is_a_clash_naming_both_not_one_output(tmp_path):
    for folder in ("A", "B"):
        (tmp_path / folder).mkdir()
        _photo(tmp_path / folder / "x.jpg")
    a, b = str(tmp_path / "A" / "x.jpg"), str(tmp_path / "B" / "x.jpg")
    for inputs in ([a, b], [tmp_path / "A", tmp_path / "B"]):
        plan = _plan(inputs, tmp_path / "o")
        assert plan.jobs == [] and len(plan.errors) == 2  # neither written: one line per input, each naming both
        out = tmp_path / "o" / "x_matte.png"
        assert plan.errors[0] == (f"{a}: its output {out} would also be written for {b}; not matted "
                                  "(rename one, or run them with different -o folders)")
        assert plan.errors[1].startswith(f"{b}: its output {out} would also be written for {a};")


def test_extension_kept_names_that_still_clash_are_refused(tmp_path):
    for name in ("a.jpg", "a.png", "a_jpg.png", "b.png"):
        _photo(tmp_path / name)
    plan = _plan([tmp_path], tmp_path / "o")
    assert _outputs(plan) == {"a.png": "a_png_matte.png", "b.png": "b_matte.png"}
    assert [e.split(":")[0] for e in plan.errors] == [str(tmp_path / "a.jpg"), str(tmp_path / "a_jpg.png")]
    assert all("a_jpg_matte.png would also be written for" in e for e in plan.errors)


def test_names_are_compared_as_a_case_insensitive_file_system_would(tmp_path):
    _photo(tmp_path / "Q.jpg")
    _photo(tmp_path / "q.png")  # another extension: both keep theirs
    (tmp_path / "sub").mkdir()
    _photo(tmp_path / "sub" / "R.jpg")
    _photo(tmp_path / "r.jpg")
    plan = _plan([tmp_path / "Q.jpg", tmp_path / "q.png", tmp_path / "sub" / "R.jpg", tmp_path / "r.jpg"],
                 tmp_path / "o")
    assert _outputs(plan) == {"Q.jpg": "Q_jpg_matte.png", "q.png": "q_png_matte.png"}
    assert len(plan.errors) == 2 and "R_matte.png would also be written for" in plan.errors[0]  # one file on macOS


def test_folder_structure_is_kept_exactly(tmp_path):
    src = tmp_path / "src"
    (src / "my.dir" / "deeper.x").mkdir(parents=True)
    _photo(src / "my.dir" / "a.jpg")
    _photo(src / "my.dir" / "deeper.x" / "p.jpg")
    _photo(src / "my.dir" / "deeper.x" / "p.png")
    plan = _plan([src], tmp_path / "o", recursive=True)
    rel = sorted(os.path.relpath(j.outputs["matte"], tmp_path / "o") for j in plan.jobs)
    assert rel == [os.path.join("my.dir", "a_matte.png"), os.path.join("my.dir", "deeper.x", "p_jpg_matte.png"),
                   os.path.join("my.dir", "deeper.x", "p_png_matte.png")]


def test_an_output_that_is_an_input_is_never_planned(tmp_path):
    _photo(tmp_path / "in.png")
    _photo(tmp_path / "in_matte.png")  # named as an input: the user's file, whatever its name
    plan = _plan([tmp_path / "in.png", tmp_path / "in_matte.png"], tmp_path)
    assert [j.source for j in plan.jobs] == [str(tmp_path / "in_matte.png")]
    assert plan.errors == [f"{tmp_path / 'in.png'}: its output {tmp_path / 'in_matte.png'} is the input "
                           f"{tmp_path / 'in_matte.png'}; not written (inputs are never replaced)"]
    # the same file under another name (a hard link in the output folder) is refused too
    out = tmp_path / "o"
    out.mkdir()
    os.link(tmp_path / "in_matte.png", out / "in_matte.png")
    plan = _plan([tmp_path / "in.png", tmp_path / "in_matte.png"], out)
    assert [j.source for j in plan.jobs] == [str(tmp_path / "in_matte.png")] and "is the input" in plan.errors[0]


def test_one_file_named_twice_is_matted_once(tmp_path):
    _photo(tmp_path / "a.png")
    plan = _plan([tmp_path / "a.png", tmp_path, tmp_path / "a.png"], tmp_path / "o")
    assert [j.source for j in plan.jobs] == [str(tmp_path / "a.png")] and plan.errors == []


def test_fifos_and_devices_are_never_read(tmp_path):
    _photo(tmp_path / "ok.png")
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "sub" / "a.png")  # opening it would block the run forever
    os.mkfifo(tmp_path / "b.png")
    for recursive in (False, True):
        plan = _plan([tmp_path], tmp_path / "o", recursive=recursive)
        assert [os.path.basename(j.source) for j in plan.jobs] == ["ok.png"] and plan.errors == []
    plan = _plan([tmp_path / "b.png", "/dev/zero"], tmp_path / "o")
    assert plan.jobs == [] and plan.errors == [f"{tmp_path / 'b.png'}: not a regular file", "/dev/zero: not a regular file"]


def test_an_output_name_too_long_for_the_file_system_fails_at_plan_time(tmp_path):
    _photo(tmp_path / ("n" * 246 + ".png"))  # 250 bytes: itself fine, its output 256
    _photo(tmp_path / ("m" * 240 + ".png"))  # its output 250 bytes: written (test_tool_hostile)
    plan = _plan([tmp_path], tmp_path / "o")
    assert [os.path.basename(j.source) for j in plan.jobs] == ["m" * 240 + ".png"]
    assert len(plan.errors) == 1 and plan.errors[0].endswith("is longer than 255 bytes")


class PickyMatter(FlatMatter):
    """Fails (as the real Matter does) on any batch holding a 'bad' image: NaN out, or out of memory."""

    def __init__(self, bad: dict[int, BaseException]) -> None:
        super().__init__()
        self.bad = bad  # image width -> what its inference raises
        self.batches: list[list[int]] = []

    def mattes(self, images):
        self.batches.append([rgb.shape[1] for rgb in images])
        for rgb in images:
            if rgb.shape[1] in self.bad:
                raise self.bad[rgb.shape[1]]
        return super().mattes(images)


def test_a_nan_or_out_of_memory_batch_fails_only_its_culprits(tmp_path):
    from modnet_npu.matting.matter import NonFiniteMatteError

    from modnet_npu.runtime.engines import OrtRunError

    for i, width in enumerate((40, 41, 42, 43, 44)):
        _photo(tmp_path / f"p{i}.png", size=(width, 30))
    matter = PickyMatter({41: NonFiniteMatteError("the model produced NaN or Inf values"), 43: MemoryError(),
                          44: OrtRunError("ONNX Runtime failed at input 64x96: Failed to allocate memory")})
    errors = []

    class Record(jobs.Progress):
        def error(self, line: str) -> None:
            errors.append(line)

    out = tmp_path / "o"
    summary = jobs.run_jobs(matter, _plan([tmp_path], out).jobs, background="white", batch=5, progress=Record())
    assert (summary.succeeded, summary.failed) == (2, 3)
    assert sorted(os.listdir(out)) == ["p0_matte.png", "p2_matte.png"]
    assert errors == [f"{tmp_path / 'p1.png'}: the model produced NaN or Inf values",
                      f"{tmp_path / 'p3.png'}: inference ran {jobs._OUT_OF_MEMORY}",
                      f"{tmp_path / 'p4.png'}: ONNX Runtime failed at input 64x96: Failed to allocate memory"]
    assert matter.batches[0] == [40, 41, 42, 43, 44] and all(len(b) == 1 for b in matter.batches[1:])


def test_decoded_pixels_in_flight_are_bounded(tmp_path, monkeypatch):
    sizes = [(100, 100), (100, 100), (300, 100), (50, 50), (100, 100), (100, 100)]
    for i, size in enumerate(sizes):
        _photo(tmp_path / f"p{i}.png", size=size)
    monkeypatch.setattr(jobs, "PIXELS_IN_FLIGHT", 25_000)
    matter = PickyMatter({})
    summary = jobs.run_jobs(matter, _plan([tmp_path], tmp_path / "o").jobs, background="white", batch=4)
    assert summary.succeeded == 6
    # 10k + 10k; the 30k image alone (over the bound by itself); 2.5k + 10k + 10k
    assert matter.batches == [[100, 100], [300], [50, 100, 100]]


def test_out_of_memory_decoding_or_writing_one_file_fails_that_file(tmp_path, monkeypatch):
    _photo(tmp_path / "a.png")
    _photo(tmp_path / "big.png", size=(80, 60))
    real_load = jobs.load_image

    def load(path):
        if "big" in str(path):
            raise MemoryError
        return real_load(path)

    monkeypatch.setattr(jobs, "load_image", load)
    job = _plan([tmp_path / "big.png"], tmp_path / "o").jobs[0]
    assert jobs.load_job(job)[2] == f"{job.source}: decoding it ran {jobs._OUT_OF_MEMORY}"
    summary = jobs.run_jobs(FlatMatter(), _plan([tmp_path], tmp_path / "o").jobs, background="white", batch=2)
    assert (summary.succeeded, summary.failed) == (1, 1) and os.listdir(tmp_path / "o") == ["a_matte.png"]


def test_the_plan_module_does_not_import_the_runner():
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; import modnet_npu.matting.video, modnet_npu.matting.plan; "
            "print('modnet_npu.matting.jobs' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr  # the jobs <-> video cycle is gone


def test_an_image_too_large_for_the_model_fails_alone(tmp_path):
    _photo(tmp_path / "ok.png")
    _photo(tmp_path / "panorama.png", size=(MAX_MODEL_SIDE * 2, 40))  # short side 64 -> long side 13107
    out = tmp_path / "o"
    plan = jobs.plan_jobs([str(tmp_path)], str(out), ["matte"], "png", False)
    matter = FlatMatter()
    summary = jobs.run_jobs(matter, plan.jobs, background="white", batch=4)
    assert (summary.succeeded, summary.failed) == (1, 1)
    assert (out / "ok_matte.png").exists() and not (out / "panorama_matte.png").exists()


def test_a_failed_write_is_one_error_and_leaves_no_temporary(tmp_path, monkeypatch):
    _photo(tmp_path / "a.png")
    out = tmp_path / "o"
    plan = jobs.plan_jobs([str(tmp_path / "a.png")], str(out), ["matte", "cutout"], "png", False)

    def full_disk(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    errors = []

    class Record(jobs.Progress):
        def error(self, line: str) -> None:
            errors.append(line)

    summary = jobs.run_jobs(FlatMatter(), plan.jobs, background="white", progress=Record())
    assert summary.failed == 1 and len(errors) == 1 and "No space left on device" in errors[0]
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("where", ["mattes", "save"])
def test_interrupting_a_run_leaves_no_temporary(tmp_path, monkeypatch, where):
    _photo(tmp_path / "a.png")
    out = tmp_path / "o"
    plan = jobs.plan_jobs([str(tmp_path / "a.png")], str(out), ["matte"], "png", False)
    matter = FlatMatter()
    if where == "mattes":
        monkeypatch.setattr(matter, "mattes", lambda images: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:
        def interrupted(dest, data):
            from modnet_npu.fileio import atomic_path

            with atomic_path(dest) as tmp:
                open(tmp, "wb").write(data[: len(data) // 2])
                assert os.path.exists(tmp)
                raise KeyboardInterrupt

        from modnet_npu.matting import codec

        monkeypatch.setattr(codec, "write_bytes", interrupted)  # jobs writes through the one encoder
    with pytest.raises(KeyboardInterrupt):
        jobs.run_jobs(matter, plan.jobs, background="white")
    assert not out.exists() or os.listdir(out) == []


# --------------------------------------------------------------------------
# warm-up: the shapes a run needs, from the headers, prepared before its first batch (modnet_npu/matting/warmup.py)
# --------------------------------------------------------------------------


def _turned_jpeg(path, size=(96, 64)) -> None:
    """A JPEG stored ``size`` (width, height) whose EXIF orientation (6) turns it a quarter when loaded."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", size, (90, 120, 30)).save(path, exif=exif)


def test_the_shape_plan_reads_each_size_from_the_header_as_the_matter_will_infer_it(tmp_path):
    from modnet_npu.matting import warmup
    from modnet_npu.matting.imaging import load_image

    _photo(tmp_path / "wide.png", size=(96, 64))
    _photo(tmp_path / "wide2.png", size=(99, 66))  # another stored size, the same model size
    _turned_jpeg(tmp_path / "turned.jpg")  # stored 96 wide, loaded 64 wide: its model size is portrait
    _photo(tmp_path / "panorama.png", size=(2000, 40))  # too large for the model under max_side 1024
    (tmp_path / "broken.png").write_bytes(b"not a png")
    matter = FlatMatter()
    rule = lambda h, w: input_size(SHORT_64, h, w, max_side=1024)  # noqa: E731
    plan = warmup.shape_plan(_plan([tmp_path], tmp_path / "o").jobs, rule, batch=4)
    decoded = [load_image(str(tmp_path / n)).shape[:2] for n in ("wide.png", "wide2.png", "turned.jpg")]
    assert plan.sizes == ((64, 96), (96, 64)) == tuple(dict.fromkeys(matter.model_size(*d) for d in decoded))
    assert plan.max_batch == 2 and plan.eager == ()  # no size has more than two images: batches of 4 never form
    assert warmup.image_dimensions(str(tmp_path / "turned.jpg")) == (96, 64)


def test_the_shape_plan_keeps_the_most_used_sizes_and_leaves_the_rest_eager(tmp_path):
    from modnet_npu.matting import warmup

    for i, (w, h, n) in enumerate([(64, 64, 1), (96, 64, 3), (64, 128, 2)]):
        for k in range(n):
            _photo(tmp_path / f"s{i}_{k}.png", size=(w, h))
    plan = warmup.shape_plan(_plan([tmp_path], tmp_path / "o").jobs, FlatMatter().model_size, batch=8, limit=2)
    assert plan.sizes == ((64, 96), (128, 64)) and plan.eager == ((64, 64),) and plan.max_batch == 3
    assert warmup.shape_plan([], FlatMatter().model_size, batch=8) == warmup.ShapePlan((), 1)


def test_an_engine_that_takes_any_shape_is_not_warmed_and_no_header_is_read(tmp_path, monkeypatch):
    from modnet_npu.matting import warmup

    _photo(tmp_path / "a.png")
    monkeypatch.setattr(warmup, "image_dimensions", lambda path: pytest.fail("a header was read"))
    matter = FlatMatter()  # no engine padding batches to a set: ONNX Runtime, OpenVINO, eager PyTorch
    assert warmup.plan_for(matter, _plan([tmp_path], tmp_path / "o").jobs, 4) is None
    assert warmup.prepare(matter, warmup.ShapePlan(((64, 64),), 2)) is None
    summary = jobs.run_jobs(matter, _plan([tmp_path], tmp_path / "o").jobs, background="white", batch=4)
    assert summary.succeeded == 1


@pytest.fixture
def captured_graphs(monkeypatch):
    """Graph capture on the CPU through the replaying stand-in (tests/fake_replay.py), as on a device."""
    from fake_replay import TapeGraphs
    from modnet_npu.runtime import acceleration

    monkeypatch.setattr(acceleration, "graph_factory", lambda device: TapeGraphs())


def test_a_local_run_prepares_its_shapes_before_the_first_batch_and_none_inside(tmp_path, monkeypatch, capsys,
                                                                              captured_graphs, flavour_files):
    """inference.py on a fast path made per shape (graph capture here; --compile takes the same path): images
    and a video at three model sizes, every shape prepared before the first batch, nothing captured after."""
    import inference
    from conftest import make_video
    from modnet_npu.matting.matter import Matter

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _photo(src / f"square{i}.png", size=(64, 64))
    _photo(src / "tall.png", size=(64, 128))
    make_video(src / "clip.mp4", frames=7)  # 96x64 frames: batches of 2, 2, 2 and 1
    seen = []
    mattes = Matter.mattes

    def spy(self, images):  # the fast path's counters as each batch starts and ends
        before = self.engine.fast_path_stats()
        out = mattes(self, images)
        seen.append((sorted({rgb.shape[:2] for rgb in images}), before, self.engine.fast_path_stats()))
        return out

    monkeypatch.setattr(Matter, "mattes", spy)
    code = inference.main([str(src), "-o", str(tmp_path / "out"), "--model", flavour_files["official"], "--backend",
                           "torch", "--device", "cpu", "--graphs", "on", "--threads", "1", "--size", "64",
                           "--batch", "2", "--mode", "matte"])
    err = capsys.readouterr().err
    assert code == 0, err
    [line] = [line for line in err.splitlines() if line.startswith("warm-up: ")]
    assert line.startswith("warm-up: batches 1,2 at 64x96, 64x64, 128x64 prepared (")  # the most used first
    shapes = {f"{b}x3x{h}x{w} float32" for h, w in ((64, 96), (64, 64), (128, 64)) for b in (1, 2)}
    first = seen[0][1]
    assert first.sealed and {p.shape for p in first.prepared} == shapes and first.captures == len(shapes)
    assert len(seen) == 2 + 4  # two batches of images, four of frames
    for sizes, before, after in seen:
        assert before.captures == after.captures == len(shapes) and after.replays > before.replays, sizes
        assert after.outside_set == () and after.eager_runs == 0, sizes
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [f"square{i}_matte.png" for i in range(3)] + ["tall_matte.png", "clip_matte.mp4"])
