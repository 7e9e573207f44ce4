"""Video matting: input failures and output failures told apart; nothing partial left."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modnet_npu.matting import jobs
from modnet_npu.matting import video
from conftest import ROOT
from modnet_npu.matting.imaging import ImageReadError
from conftest import make_video


class FlatMatter:
    """Stands in for Matter: a flat matte per frame, optionally interrupted on the n-th batch."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls = 0
        self.interrupt_at = interrupt_at

    def mattes(self, images):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return [np.full(rgb.shape[:2], 0.5, np.float32) for rgb in images]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    make_video(path)
    return path


def _job(clip: Path, out: Path, modes=("matte", "cutout")) -> jobs.Job:
    plan = jobs.plan_jobs([str(clip)], str(out), list(modes), "png", False)
    return plan.jobs[0]


def test_frames_counted_and_outputs_written(clip, tmp_path):
    job = _job(clip, tmp_path)
    assert video.process_video(FlatMatter(), job, "white", batch=5) == 12
    assert sorted(os.listdir(tmp_path)) == ["clip_cutout.mov", "clip_matte.mp4"]


def test_a_write_failure_names_the_output_not_the_input(clip, tmp_path, monkeypatch):
    def disk_full(self, packets):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(video._VideoWriter, "_mux", disk_full)
    job = _job(clip, tmp_path)
    with pytest.raises(video.VideoWriteError) as info:
        video.process_video(FlatMatter(), job, "white", batch=4)
    msg = str(info.value)
    assert msg.startswith(f"writing {tmp_path / 'clip_'}") and msg.endswith("failed: No space left on device")
    assert "decoding" not in msg and ".part" not in msg
    assert os.listdir(tmp_path) == []  # neither output, no temporary


_FSIZE = """
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
import inference
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
sys.exit(inference.main(sys.argv[2:]))
"""


def test_a_real_write_failure_through_the_cli(clip, tmp_path, webnn_file):
    # a file-size limit makes the kernel refuse the encoder's writes, as a full disk would
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _FSIZE, str(ROOT), str(clip), "-o", str(out), "--model", webnn_file,
                           "--backend", "ort", "--mode", "matte", "--mode", "cutout", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"writing {out}{os.sep}clip_" in lines[0] and "failed: File too large" in lines[0]
    assert "decoding" not in lines[0] and ".part" not in lines[0]
    assert os.listdir(out) == []


def test_an_unreadable_input_is_a_read_error(clip, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # the index (moov) is at the end
    with pytest.raises(ImageReadError, match=r"broken\.mp4: not a readable video") as info:
        video.process_video(FlatMatter(), _job(broken, tmp_path / "o"), "white")
    assert not isinstance(info.value, video.VideoWriteError)
    assert not (tmp_path / "o").exists()


def test_interrupting_a_video_leaves_no_temporary(clip, tmp_path):
    job = _job(clip, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        video.process_video(FlatMatter(interrupt_at=2), job, "white", batch=4)
    assert os.listdir(tmp_path) == []


def make_resizing_video(path: Path) -> None:
    """Six 96x64 frames, then six 64x48 ones: two MPEG-TS streams back to back (a broadcast
    recording's resolution switch), named .mp4 as such files often are."""
    import av

    parts = []
    for width, height in ((96, 64), (64, 48)):
        buf = io.BytesIO()
        with av.open(buf, "w", format="mpegts") as out:
            stream = out.add_stream("libx264", rate=24)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(6):
                frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        parts.append(buf.getvalue())
    path.write_bytes(b"".join(parts))


def test_a_resolution_change_mid_stream_is_an_input_problem(tmp_path):
    src = tmp_path / "switch.mp4"
    make_resizing_video(src)
    out = tmp_path / "o"
    with pytest.raises(video.ResolutionChangeError) as info:
        video.process_video(FlatMatter(), _job(src, out), "white", batch=4)
    assert isinstance(info.value, ImageReadError) and not isinstance(info.value, video.VideoWriteError)
    assert str(info.value) == (f"{src}: the resolution changes mid-stream (frame 7 is 64x48, the video 96x64); "
                               "videos of one resolution only (split it, or scale it with ffmpeg first)")
    assert not out.exists() or os.listdir(out) == []  # nothing partial


def test_the_warm_up_reads_a_videos_frame_size_and_count_from_its_stream(clip, tmp_path):
    """The model size of a video's frames comes from its stream (no frame decoded), counted once per frame."""
    from modnet_npu.matting import warmup
    from modnet_npu.matting.imaging import ShortSide, input_size
    from modnet_npu.matting.plan import Job

    assert warmup.video_dimensions(str(clip)) == ((64, 96), 12)  # conftest.make_video: 96x64, 12 frames
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert warmup.video_dimensions(str(tmp_path / "bad.mp4")) is None
    rule = lambda h, w: input_size(ShortSide(32), h, w)  # noqa: E731
    jobs_ = [Job(str(clip), "video"), Job(str(tmp_path / "bad.mp4"), "video")]
    assert warmup.shape_plan(jobs_, rule, batch=16) == warmup.ShapePlan(((32, 32),), 12)  # 12 frames: no batch of 16
