from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inference
from conftest import PORTRAIT, ROOT, make_video
from modnet_npu.matting import foreground
from modnet_npu.matting.imaging import to_uint8


@pytest.fixture(scope="module")
def matter(webnn_file):
    return inference.Matter(model=webnn_file, backend="torch", device="cpu", size=256)


def test_matte_cutout_composite_on_the_portrait(matter, tmp_path):
    alpha = matter.matte(str(PORTRAIT))
    assert alpha.shape == (512, 512) and alpha.dtype == np.float32 and 0 <= alpha.min() and alpha.max() <= 1
    rgba = matter.cutout(Image.open(PORTRAIT))  # a PIL image works too
    assert rgba.shape == (512, 512, 4) and np.array_equal(rgba[..., 3], to_uint8(alpha))
    rgb = np.asarray(Image.open(PORTRAIT))
    backdrop = tmp_path / "bg.png"
    Image.fromarray(np.full((100, 300, 3), (10, 20, 30), np.uint8)).save(backdrop)
    for bg in ("#00ff00", "white", str(backdrop), "blur"):
        out = matter.composite(rgb, bg)
        assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    green = matter.composite(rgb, "#00ff00").astype(float)
    expect = rgb * alpha[..., None] + np.array([0, 255, 0]) * (1 - alpha[..., None])
    assert np.abs(green - expect).max() <= 1.0


def test_torch_and_ort_agree_within_one_level(webnn_file, matter):
    ort = inference.Matter(model=webnn_file, backend="ort")
    assert ort.backend.fixed_size == (256, 256)
    a = to_uint8(matter.matte(str(PORTRAIT))).astype(int)
    b = to_uint8(ort.matte(str(PORTRAIT))).astype(int)
    assert np.abs(a - b).max() <= 1


def _mixed_folder(root: Path) -> None:
    base = Image.open(PORTRAIT)
    sub = root / "sub"
    sub.mkdir(parents=True)
    small = base.resize((96, 72))
    Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257)).save(root / "gray16.png")
    small.convert("CMYK").save(root / "cmyk.jpg")
    rgba = small.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    small.save(root / "rotated.jpg", exif=exif.tobytes())
    base.resize((4000, 3000)).save(root / "big.jpg", quality=80)
    base.resize((47, 33)).save(root / "tiny.png")
    small.convert("P").save(root / "palette.png")
    small.convert("L").save(root / "gray.jpg")
    small.save(root / "photo.webp")
    small.save(root / "photo.bmp")
    small.save(sub / "photo.tiff")
    for i in range(9):
        base.resize((80 + 8 * i, 64)).save(sub / f"frame{i}.jpg")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.txt").write_text("not an image, ignored")


def test_folder_of_mixed_images_with_one_corrupt(tmp_path, webnn_file, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _mixed_folder(src)
    code = inference.main([str(src), "-o", str(out), "--recursive", "--model", webnn_file, "--size", "256",
                           "--device", "cpu", "--mode", "matte", "--batch", "4"])
    err = capsys.readouterr().err
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert code == 1
    assert len(outputs) == 20 and "sub/frame3_matte.png" in outputs and "big_matte.png" in outputs
    # photo.webp and photo.bmp share a stem: their extensions keep them apart
    assert "photo_webp_matte.png" in outputs and "photo_bmp_matte.png" in outputs
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt.jpg" in errors[0]
    assert "20 succeeded, 1 failed" in err
    assert Image.open(out / "big_matte.png").size == (4000, 3000)
    assert Image.open(out / "rotated_matte.png").size == (72, 96)
    assert Image.open(out / "tiny_matte.png").size == (47, 33)
    # a second run leaves existing outputs alone
    code = inference.main([str(src / "tiny.png"), "-o", str(out), "--model", webnn_file, "--mode", "matte"])
    assert code == 0 and "skipped" in capsys.readouterr().err


def test_video_keeps_frames_rate_audio_and_alpha(tmp_path, webnn_file, capsys):
    import av

    clip = tmp_path / "clip.mp4"
    make_video(clip)
    out = tmp_path / "out"
    code = inference.main([str(clip), "-o", str(out), "--model", webnn_file, "--device", "cpu", "--size", "64",
                           "--mode", "matte", "--mode", "cutout", "--batch", "5", "--temporal"])
    assert code == 0, capsys.readouterr().err
    for name in ("clip_matte.mp4", "clip_cutout.mov"):
        with av.open(str(out / name)) as c:
            v = c.streams.video[0]
            assert v.average_rate == 24
            assert len(c.streams.audio) == 1
            frames = list(c.decode(video=0))
            assert len(frames) == 12
            if name.endswith(".mov"):
                alpha = frames[0].to_ndarray(format="rgba")[..., 3]
                assert alpha.std() > 1 and 0 < alpha.mean() < 255


def test_stdin_to_stdout(webnn_file):
    data = PORTRAIT.read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "-", "--mode", "matte", "--model", webnn_file,
                           "--size", "256", "--device", "cpu"], input=data, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    img = Image.open(io.BytesIO(proc.stdout))
    assert img.mode == "L" and img.size == (512, 512)


@pytest.mark.parametrize("args,code,expect", [
    (["x.jpg"], 2, "--output-dir is required"),
    (["-", "--mode", "matte", "--mode", "cutout"], 2, "exactly one --mode"),
    (["x.jpg", "-o", "o", "--background", "greenish"], 1, "not a colour"),
    (["x.jpg", "-o", "o", "--backend", "ort", "--device", "cuda"], 2, "ort backend runs on the CPU"),
    (["x.jpg", "-o", "o", "--device", "npu"], 1, "torch_npu"),
])
def test_bad_arguments_are_one_line_errors(args, code, expect, webnn_file, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert inference.main([*args, "--model", webnn_file]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err


def test_missing_input_is_reported_and_others_processed(tmp_path, webnn_file, capsys):
    code = inference.main([str(tmp_path / "nope.jpg"), str(PORTRAIT), "-o", str(tmp_path / "o"),
                           "--model", webnn_file, "--size", "128", "--mode", "matte"])
    assert code == 1 and (tmp_path / "o" / "portrait_astronaut_matte.png").exists()
    assert "nope.jpg: no such file" in capsys.readouterr().err


def test_missing_model_does_not_silently_use_a_generated_one(tmp_path, capsys):
    code = inference.main([str(PORTRAIT), "-o", str(tmp_path), "--offline", "--models-dir", str(tmp_path / "m")])
    assert code == 1 and "offline" in capsys.readouterr().err


def test_cli_prints_the_backend_it_chose(tmp_path, webnn_file, capsys):
    code = inference.main([str(PORTRAIT), "-o", str(tmp_path), "--model", webnn_file, "--mode", "matte"])
    err = capsys.readouterr().err
    from modnet_npu.runtime.engines import choose_backend

    chosen, why = choose_backend("auto", "auto")  # whatever this machine has
    described = "ONNX Runtime" if chosen == "ort" else "PyTorch on"
    assert code == 0 and f"backend {chosen} ({why})" in err and described in err


def test_output_folder_inside_the_input_is_not_read_back(tmp_path, webnn_file, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    Image.open(PORTRAIT).resize((64, 64)).save(src / "a.jpg")
    out = src / "mattes"
    for _ in range(2):
        code = inference.main([str(src), "-o", str(out), "--recursive", "--overwrite", "--model", webnn_file,
                               "--mode", "composite", "--format", "jpg", "--backend", "ort"])
        assert code == 0
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a_composite.jpg"]
    assert "1 succeeded" in capsys.readouterr().err


# ---- issue #13: per-file decisions, own outputs, bad models, interrupts, one-line errors ----


def _small_photo(path: Path) -> None:
    Image.open(PORTRAIT).resize((64, 48)).save(path)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_rerun_produces_only_the_missing_output(tmp_path, webnn_file, capsys):
    import os

    _small_photo(tmp_path / "a.jpg")
    out = tmp_path / "out"
    argv = [str(tmp_path / "a.jpg"), "-o", str(out), "--model", webnn_file, "--backend", "ort",
            "--mode", "matte", "--mode", "cutout"]
    assert inference.main(argv) == 0
    (out / "a_cutout.png").unlink()
    os.utime(out / "a_matte.png", (1_000_000, 1_000_000))  # any rewrite would move this
    assert inference.main(argv) == 0, capsys.readouterr().err
    assert (out / "a_cutout.png").exists() and Image.open(out / "a_cutout.png").mode == "RGBA"
    assert os.stat(out / "a_matte.png").st_mtime == 1_000_000
    assert "1 succeeded, 0 failed, 0 skipped" in capsys.readouterr().err


def test_output_folder_that_is_the_input_folder(tmp_path, webnn_file, capsys):
    _small_photo(tmp_path / "a.jpg")
    argv = [str(tmp_path), "-o", str(tmp_path), "--model", webnn_file, "--backend", "ort",
            "--mode", "matte", "--mode", "cutout"]
    assert inference.main(argv) == 0
    capsys.readouterr()
    assert inference.main(argv) == 0
    err = capsys.readouterr().err
    assert "left out 2 file(s) this tool wrote" in err and "0 succeeded, 0 failed, 1 skipped" in err
    assert _files(tmp_path) == ["a.jpg", "a_cutout.png", "a_matte.png"]  # no a_matte_matte.png


def _bad_model(kind: str, path: Path, webnn_file: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(Path(webnn_file).read_bytes()[:200_000])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(50_000))
    else:  # a valid ONNX file that is not MODNet: same input and output, one Sigmoid
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 256, 256])
        y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 256, 256])
        graph = helper.make_graph([helper.make_node("Sigmoid", ["input"], ["output"])], "not_modnet", [x], [y])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "random", "not-modnet"])
def test_a_broken_or_foreign_model_is_one_line(kind, backend, tmp_path, webnn_file, capsys):
    model = tmp_path / "model.onnx"
    _bad_model(kind, model, webnn_file)
    out = tmp_path / "out"
    code = inference.main([str(PORTRAIT), "-o", str(out), "--model", str(model), "--backend", backend, "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("where", ["inference", "writing"])
def test_ctrl_c_is_one_line_and_leaves_no_temporary(where, tmp_path, webnn_file, capsys, monkeypatch):
    from modnet_npu.matting import codec
    from modnet_npu.matting import matter as matting
    from modnet_npu.fileio import atomic_path

    if where == "inference":
        def interrupted(self, images):
            raise KeyboardInterrupt

        monkeypatch.setattr(matting.Matter, "mattes", interrupted)
    else:
        def interrupted(dest, data):
            with atomic_path(dest) as tmp:
                Path(tmp).write_bytes(data[: len(data) // 2])
                raise KeyboardInterrupt

        monkeypatch.setattr(codec, "write_bytes", interrupted)
    out = tmp_path / "out"
    code = inference.main([str(PORTRAIT), "-o", str(out), "--model", webnn_file, "--backend", "ort",
                           "--mode", "matte", "--quiet"])
    err = capsys.readouterr().err
    assert code == 130 and err.startswith("error: interrupted") and err.count("\n") == 1
    assert not out.exists() or _files(out) == []


def test_output_dir_that_is_a_file_fails_before_any_model(tmp_path, capsys, monkeypatch):
    target = tmp_path / "taken.png"
    target.write_bytes(b"keep me")
    monkeypatch.setattr(inference, "Matter", lambda *a, **k: pytest.fail("a model was loaded"))
    code = inference.main([str(PORTRAIT), "-o", str(target)])
    err = capsys.readouterr().err
    assert code in (1, 2) and err == f"error: -o {target}: is a file, not a folder\n"
    assert target.read_bytes() == b"keep me"


def test_missing_background_file_is_named_as_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inference, "Matter", lambda *a, **k: pytest.fail("a model was loaded"))
    code = inference.main([str(PORTRAIT), "-o", str(tmp_path), "--mode", "composite",
                           "--background", str(tmp_path / "missing.png")])
    err = capsys.readouterr().err
    assert code == 1 and err == f"error: --background {tmp_path / 'missing.png'}: no such file\n"


def test_garbage_on_stdin_is_one_line_without_an_object_repr(webnn_file):
    garbage = b"this is not an image" * 10
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "-", "--mode", "matte", "--model", webnn_file,
                           "--backend", "ort", "--quiet"], input=garbage, capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and proc.stdout == b""
    assert err == f"error: stdin: not a readable image ({len(garbage)} bytes)\n"


def test_empty_folder_is_an_error_not_a_success(tmp_path, webnn_file, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code = inference.main([str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--model", webnn_file,
                           "--backend", "ort", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err == "error: no images or videos found in the inputs\n"
    assert "succeeded" not in err


def test_output_dir_with_stdin_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inference, "Matter", lambda *a, **k: pytest.fail("a model was loaded"))
    assert inference.main(["-", "--mode", "matte", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "stdout" in err
    assert not (tmp_path / "o").exists()


def test_stale_temporaries_in_the_output_folder_are_removed(tmp_path, webnn_file):
    import os
    import time

    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".clip_matte.k3j_a9zq.part.mp4"  # what a SIGKILLed run leaves
    stale.write_bytes(b"\0" * 1000)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    _small_photo(tmp_path / "a.jpg")
    assert inference.main([str(tmp_path / "a.jpg"), "-o", str(out), "--model", webnn_file, "--backend", "ort",
                           "--mode", "matte", "--quiet"]) == 0
    assert _files(out) == ["a_matte.png"]


# --------------------------------------------------------------------------
# --decontaminate (rembg's dc): the foreground's own colours at soft edges
# --------------------------------------------------------------------------

MAGENTA = (255, 0, 255)


class _HalfMatter:
    """Stands in for Matter: a matte of 0.5 everywhere, every pixel a soft edge."""

    def mattes(self, images):
        return [np.full(rgb.shape[:2], 0.5, np.float32) for rgb in images]

    def model_size(self, height, width):
        return (256, 256)


@pytest.fixture()
def estimated(monkeypatch):
    """foreground.estimate_foreground recorded, answering magenta: where it reached is plain to see."""
    calls = []

    def magenta(rgb, alpha):
        calls.append(rgb.shape)
        return np.broadcast_to(np.array(MAGENTA, np.uint8), rgb.shape).copy()

    monkeypatch.setattr(foreground, "estimate_foreground", magenta)
    monkeypatch.setattr(foreground, "available", lambda: True)
    return calls


def test_decontaminate_reaches_cutouts_and_composites_of_photos_and_videos(tmp_path, estimated):
    import av

    from modnet_npu.matting import jobs

    clip = tmp_path / "clip.mp4"
    make_video(clip)
    modes = ["matte", "cutout", "composite"]
    plan = jobs.plan_jobs([str(PORTRAIT), str(clip)], str(tmp_path / "clean"), modes, "png", False)
    summary = jobs.run_jobs(_HalfMatter(), plan.jobs, background="white", batch=4, decontaminate=True)
    assert (summary.succeeded, summary.failed) == (2, 0)
    assert estimated == [(512, 512, 3)] + [(64, 96, 3)] * 12  # once per image or frame, for both colour modes
    out = tmp_path / "clean"
    cut = np.asarray(Image.open(out / "portrait_astronaut_cutout.png"))
    assert (cut[..., :3] == MAGENTA).all() and (cut[..., 3] == 128).all()  # the estimate's colours, the same alpha
    comp = np.asarray(Image.open(out / "portrait_astronaut_composite.png")).astype(int)
    assert np.abs(comp - (255, 127.5, 255)).max() <= 1  # magenta half over white
    assert (np.asarray(Image.open(out / "portrait_astronaut_matte.png")) == 128).all()  # no colours: unchanged
    with av.open(str(out / "clip_cutout.mov")) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgba").astype(int)
    assert np.abs(frame[..., :3] - MAGENTA).max() <= 4  # ProRes 4444, 10-bit: a few levels at most

    plain = jobs.plan_jobs([str(PORTRAIT)], str(tmp_path / "plain"), ["cutout"], "png", False)
    jobs.run_jobs(_HalfMatter(), plain.jobs, background="white")
    assert len(estimated) == 13  # not asked: not called
    rgb = np.asarray(Image.open(PORTRAIT).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "portrait_astronaut_cutout.png"))[..., :3], rgb)


def test_decontaminate_reaches_the_ray_workers_writes(tmp_path, estimated, monkeypatch, webnn_file):
    import json

    from modnet_npu.matting import scaleout
    from modnet_npu.matting.jobs import RunSummary

    seen = {}

    def run_on_ray(todo, **kwargs):
        seen.update(kwargs)
        return RunSummary(len(todo), 0, 0, len(todo), 0, 1.0)

    monkeypatch.setattr(scaleout, "require_ray", lambda: None)
    monkeypatch.setattr(scaleout, "run_on_ray", run_on_ray)
    assert inference.main([str(PORTRAIT), "-o", str(tmp_path / "o"), "--model", webnn_file, "--ray",
                           "--decontaminate", "--quiet"]) == 0
    assert seen["decontaminate"] is True
    # what the write stage of the Ray run does with it (scaleout._save), without Ray
    rgb = np.asarray(Image.open(PORTRAIT).convert("RGB"))
    target = str(tmp_path / "ray_cutout.png")

    def column(*items):
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out

    batch = {"source": column("p.jpg"), "path": column(str(PORTRAIT)), "error": column(""),
             "outputs": column(json.dumps({"cutout": target})), "rgb": column(rgb),
             "alpha": column(np.full((512, 512), 0.5, np.float32)), "note": column("")}
    assert scaleout._save(batch, background="white", decontaminate=True)["error"][0] == ""
    assert (np.asarray(Image.open(target))[..., :3] == MAGENTA).all()


def test_decontaminate_is_refused_before_any_work_when_it_cannot_apply(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no-model.onnx")  # never reached: the checks come first
    assert inference.main([str(PORTRAIT), "-o", "o", "--mode", "matte", "--decontaminate", "--model", missing]) == 2
    assert "--mode matte has none" in capsys.readouterr().err
    monkeypatch.setattr(foreground, "available", lambda: False)
    assert inference.main([str(PORTRAIT), "-o", "o", "--decontaminate", "--model", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --decontaminate needs pymatting") and "pip install pymatting" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.mark.slow  # two processes with the real model: about 10 s on a busy 2-core machine
@pytest.mark.skipif(not foreground.available(), reason="pymatting not installed: " + foreground.INSTALL_HINT)
def test_decontaminate_on_stdin_changes_only_the_soft_edges_colours(real_model):
    def run(*extra):
        proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "-", "--mode", "cutout", "--model",
                               real_model, "--backend", "ort", *extra], input=PORTRAIT.read_bytes(),
                              capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()
        return np.asarray(Image.open(io.BytesIO(proc.stdout))).astype(int)

    plain, clean = run(), run("--decontaminate")
    assert np.array_equal(plain[..., 3], clean[..., 3])  # the same matte
    soft = (plain[..., 3] > 12) & (plain[..., 3] < 243)
    solid = plain[..., 3] == 255  # the real model's matte: a solid subject with soft edges
    assert soft.sum() > 100 and solid.sum() > 10_000
    changed = np.abs(plain[..., :3] - clean[..., :3]).max(axis=2)
    assert changed[soft].mean() > 4 * max(changed[solid].mean(), 0.5)  # the edges' colours, not the subject's
