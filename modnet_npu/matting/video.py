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

from modnet_npu.errors import ModnetError
from modnet_npu.fileio import atomic_path
from modnet_npu.matting import foreground
from modnet_npu.matting.imaging import ImageReadError, make_background, one_frame_delay
from modnet_npu.matting.plan import Job
from modnet_npu.matting.matter import Matter, render


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


class VideoWriteError(ModnetError, OSError):
    """Writing a video output failed (disk full, no permission, encoder refused): the
    output's fault, told apart from an input that cannot be decoded (ImageReadError)."""


def _why(exc: BaseException) -> str:
    """The reason without the temporary file's name FFmpeg and OSError append."""
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0] or type(exc).__name__


@contextlib.contextmanager
def _writing(dest: str) -> Iterator[None]:
    """Failures of the output side, named after the output the user asked for."""
    import av

    try:
        yield
    except VideoWriteError:
        raise
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoWriteError(f"writing {dest} failed: {_why(exc)}") from None


@contextlib.contextmanager
def _decoding(source: str) -> Iterator[None]:
    """Failures of FFmpeg while demuxing or decoding the input (the writers raise their own type)."""
    import av

    try:
        yield
    except av.error.FFmpegError as exc:
        raise ImageReadError(f"{source}: video decoding failed ({_why(exc)})") from None


class _VideoWriter:
    """One output video: every call reports failures as VideoWriteError naming ``dest``."""

    def __init__(self, dest: str, tmp: str, mode: str, width: int, height: int, rate, time_base, audio) -> None:
        import av

        self.dest, self.mode = dest, mode
        with _writing(dest):
            self.container = av.open(tmp, "w", format="mov" if dest.endswith(".mov") else "mp4")
            self._add_streams(width, height, rate, time_base, audio)

    def _add_streams(self, width: int, height: int, rate, time_base, audio) -> None:
        if self.mode == "cutout":
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

    def _mux(self, packets) -> None:
        for packet in packets:
            self.container.mux(packet)

    def write(self, array: np.ndarray, pts, time_base) -> None:
        import av

        if array.ndim == 2:  # a matte: gray as RGB
            array = np.repeat(array[..., None], 3, axis=2)
        with _writing(self.dest):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=self.fmt)
            frame.pts, frame.time_base = pts, time_base
            self._mux(self.stream.encode(frame))

    def write_audio(self, frame) -> None:
        if self.audio is not None:
            with _writing(self.dest):
                self._mux(self.audio.encode(frame))

    def close(self) -> None:
        with _writing(self.dest):
            self._mux(self.stream.encode())
            if self.audio is not None:
                self._mux(self.audio.encode())
            container, self.container = self.container, None
            container.close()

    def discard(self) -> None:
        """Close quietly after a failure (the temporary is removed by atomic_path)."""
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.close()
            self.container = None


def _open_writers(stack: contextlib.ExitStack, job: Job, vs, audio) -> dict[str, _VideoWriter]:
    rate = vs.average_rate or vs.guessed_rate or 25
    width, height = vs.codec_context.width, vs.codec_context.height
    writers = {}
    for mode, path in job.outputs.items():
        with _writing(path):
            tmp = stack.enter_context(atomic_path(path))
        writers[mode] = _VideoWriter(path, tmp, mode, width, height, rate, vs.time_base, audio)
        stack.callback(writers[mode].discard)  # runs before atomic_path removes the temporary
    return writers


class ResolutionChangeError(ImageReadError):
    """A video whose frames change size mid-stream: an input this tool does not take (its outputs
    have one size), told apart from a failed write."""


def _check_size(source: str, frame, size: tuple[int, int], index: int) -> None:
    if (frame.width, frame.height) != size:
        raise ResolutionChangeError(
            f"{source}: the resolution changes mid-stream (frame {index + 1} is {frame.width}x{frame.height}, "
            f"the video {size[0]}x{size[1]}); videos of one resolution only (split it, or scale it with ffmpeg first)")


def _decoded(src, vs, audio, writers: dict[str, _VideoWriter], batch: int, source: str) -> Iterator[list[tuple]]:
    """Batches of (frame, rgb) from the video stream; audio frames go straight to the writers."""
    pending = []
    size, index = (vs.codec_context.width, vs.codec_context.height), 0
    for packet in src.demux(*[s for s in (vs, audio) if s is not None]):
        for frame in packet.decode():
            if packet.stream.type == "audio":
                for w in writers.values():
                    w.write_audio(frame)
                continue
            _check_size(source, frame, size, index)
            index += 1
            pending.append((frame, frame.to_ndarray(format="rgb24")))
            if len(pending) >= batch:
                yield pending
                pending = []
    if pending:
        yield pending


def _matted(matter: Matter, batches: Iterator[list[tuple]], on_frames: Callable[[int], None]) -> Iterator[tuple]:
    for pending in batches:
        alphas = matter.mattes([rgb for _, rgb in pending])
        on_frames(len(pending))
        for (frame, rgb), alpha in zip(pending, alphas, strict=True):
            yield frame, rgb, alpha


def _open_source(source: str):
    import av

    try:
        src = av.open(source)
    except av.error.FFmpegError as exc:
        raise ImageReadError(f"{source}: not a readable video ({_why(exc)})") from None
    if not src.streams.video:
        src.close()
        raise ImageReadError(f"{source}: has no video stream")
    return src


def process_video(
    matter: Matter,
    job: Job,
    background: str,
    batch: int = 8,
    temporal: bool = False,
    on_frames: Callable[[int], None] = lambda n: None,
    on_total: Callable[[int | None], None] = lambda n: None,
    *,
    decontaminate: bool = False,
) -> int:
    """Matte every frame of a video into each mode's output; returns the frame count.

    Same frame rate, frame count and timestamps as the source; the audio track
    is carried over (re-encoded as AAC); frames are inferred in batches. An input
    that cannot be read raises ImageReadError (ResolutionChangeError when its
    frames change size mid-stream: the outputs have one size); an output that
    cannot be written, VideoWriteError naming it; a model output that is not
    finite, NonFiniteMatteError; in every case no partial output is left.
    ``decontaminate``: cutout and composite frames with the foreground's own
    colours at soft edges (``foreground``, frame by frame).
    """
    src = _open_source(job.source)
    with src, contextlib.ExitStack() as stack:
        vs = src.streams.video[0]
        vs.thread_type = "AUTO"
        audio = src.streams.audio[0] if src.streams.audio else None
        on_total(vs.frames or None)  # 0 when the container does not say
        writers = _open_writers(stack, job, vs, audio)
        height, width = vs.codec_context.height, vs.codec_context.width
        bg = background if background == "blur" else make_background(background, np.zeros((height, width, 3), np.uint8))
        count = 0
        with _decoding(job.source):
            for frame, rgb, alpha in _smoothed(_matted(matter, _decoded(src, vs, audio, writers, batch, job.source), on_frames),
                                               temporal):
                colours = foreground.colours_by_mode(writers, rgb, alpha, decontaminate=decontaminate)
                for mode, w in writers.items():
                    w.write(render(mode, colours[mode], alpha, bg), frame.pts, frame.time_base)
                count += 1
        for w in writers.values():
            w.close()
    return count
