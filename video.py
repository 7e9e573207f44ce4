"""Video matting: every frame of a video into each mode's output, with PyAV.

Same frame rate, frame count and timestamps as the source; the audio track is
carried over (re-encoded as AAC); ``cutout`` goes to ProRes 4444 (``.mov``),
which keeps the alpha channel; frames are inferred in batches.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable, Iterator

import numpy as np

from fileio import atomic_path
from imaging import ImageReadError, make_background, one_frame_delay
from jobs import Job
from matting import Matter, render


def _smoothed(items: Iterator[tuple], temporal: bool) -> Iterator[tuple]:
    """Yield (frame, rgb, alpha) with MODNet's one-frame-delay smoothing when asked."""
    if not temporal:
        yield from items
        return
    window: deque = deque(maxlen=3)
    for item in items:
        window.append(item)
        if len(window) == 1:
            continue
        if len(window) == 2:
            yield window[0]
            continue
        prev, cur, nxt = window
        yield (cur[0], cur[1], one_frame_delay(prev[2], cur[2], nxt[2]))
    if len(window) >= 2:
        yield window[-1]


class _VideoWriter:
    def __init__(self, path: str, mode: str, width: int, height: int, rate, time_base, audio) -> None:
        import av

        self.mode = mode
        self.container = av.open(path, "w", format="mov" if path.endswith(".mov") else "mp4")
        if mode == "cutout":
            self.stream = self.container.add_stream("prores_ks", rate=rate)
            self.stream.pix_fmt = "yuva444p10le"
            self.stream.options = {"profile": "4444"}
            self.fmt = "rgba"
        else:
            self.stream = self.container.add_stream("libx264", rate=rate)
            # 4:2:0 needs even sides
            self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
            self.stream.options = {"crf": "18"}
            self.fmt = "rgb24"
        self.stream.width, self.stream.height = width, height
        self.stream.time_base = time_base
        self.audio = None
        if audio is not None:
            self.audio = self.container.add_stream("aac", rate=audio.codec_context.sample_rate)
            self.audio.layout = audio.codec_context.layout

    def write(self, array: np.ndarray, pts, time_base) -> None:
        import av

        if array.ndim == 2:  # a matte: gray as RGB
            array = np.repeat(array[..., None], 3, axis=2)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=self.fmt)
        frame.pts, frame.time_base = pts, time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def write_audio(self, frame) -> None:
        if self.audio is not None:
            for packet in self.audio.encode(frame):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        if self.audio is not None:
            for packet in self.audio.encode():
                self.container.mux(packet)
        self.container.close()


def process_video(
    matter: Matter,
    job: Job,
    background: str,
    batch: int = 8,
    temporal: bool = False,
    on_frames: Callable[[int], None] = lambda n: None,
    on_total: Callable[[int | None], None] = lambda n: None,
) -> int:
    """Matte every frame of a video into each mode's output; returns the frame count.

    Same frame rate, frame count and timestamps as the source; the audio track
    is carried over (re-encoded as AAC); frames are inferred in batches.
    """
    import av

    try:
        src = av.open(job.source)
    except av.error.FFmpegError as exc:
        raise ImageReadError(f"{job.source}: not a readable video ({exc})") from None
    with src, contextlib.ExitStack() as stack:
        if not src.streams.video:
            raise ImageReadError(f"{job.source}: has no video stream")
        vs = src.streams.video[0]
        vs.thread_type = "AUTO"
        audio = src.streams.audio[0] if src.streams.audio else None
        on_total(vs.frames or None)  # 0 when the container does not say
        rate = vs.average_rate or vs.guessed_rate or 25
        width, height = vs.codec_context.width, vs.codec_context.height
        writers = {}
        for mode, path in job.outputs.items():
            tmp = stack.enter_context(atomic_path(path))
            writers[mode] = _VideoWriter(tmp, mode, width, height, rate, vs.time_base, audio)
        fixed_bg = None if background == "blur" else make_background(background, np.zeros((height, width, 3), np.uint8))

        def decoded() -> Iterator[tuple]:
            pending = []
            streams = [s for s in (vs, audio) if s is not None]
            for packet in src.demux(*streams):
                for frame in packet.decode():
                    if packet.stream.type == "audio":
                        for w in writers.values():
                            w.write_audio(frame)
                        continue
                    pending.append((frame, frame.to_ndarray(format="rgb24")))
                    if len(pending) >= batch:
                        yield from _infer(pending)
                        pending = []
            if pending:
                yield from _infer(pending)

        def _infer(pending: list) -> Iterator[tuple]:
            alphas = matter.mattes([rgb for _, rgb in pending])
            on_frames(len(pending))
            for (frame, rgb), alpha in zip(pending, alphas):
                yield frame, rgb, alpha

        count = 0
        try:
            for frame, rgb, alpha in _smoothed(decoded(), temporal):
                for mode, w in writers.items():
                    bg = fixed_bg if fixed_bg is not None else background
                    w.write(render(mode, rgb, alpha, bg), frame.pts, frame.time_base)
                count += 1
        except av.error.FFmpegError as exc:
            raise ImageReadError(f"{job.source}: video decoding failed ({exc})") from None
        for w in writers.values():
            w.close()
    return count
