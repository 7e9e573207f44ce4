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
