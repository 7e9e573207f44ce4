"""Matte photos, folders and videos with MODNet, on PyTorch (NPU, CUDA, MPS,
CPU) or ONNX Runtime.

Python API::

    from inference import Matter
    matter = Matter(model="models/modnet.onnx", backend="torch", device="auto")
    alpha = matter.matte("photo.jpg")            # float32 (H, W) in [0, 1]
    rgba = matter.cutout("photo.jpg")            # uint8 (H, W, 4)
    rgb = matter.composite("photo.jpg", "blur")  # uint8 (H, W, 3)

Command line: ``python3 inference.py INPUT... -o OUTDIR [options]``; the CLI is
a thin layer over :class:`Matter`, :func:`process_image_batch` and
:func:`process_video`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from devices import DeviceError
from fast_path import FastPathError
from fileio import atomic_path, write_image
from modnet_fast import PRECISIONS
from imaging import (
    ImageLike,
    ImageReadError,
    Size,
    composite,
    cutout,
    load_image,
    make_background,
    matte_to_size,
    normalize,
    one_frame_delay,
    resize_rgb,
    resolve_size,
    short_side_size,
    to_uint8,
)
from model_source import DEFAULT_MODEL_ID, DEFAULT_MODELS_DIR, ModelSourceError, resolve_model, synthetic_fallback

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}
MODES = ("matte", "cutout", "composite")
FORMATS = ("png", "jpg", "webp")


# --------------------------------------------------------------------------
# backends: (N, 3, h, w) normalised float32 -> (N, h, w) alpha
# --------------------------------------------------------------------------


class TorchBackend:
    """The converted PyTorch MODNet (inference form) on a device, through the fast path."""

    name = "torch"

    def __init__(self, onnx_path: str, device: str = "auto", precision: str = "fp32", threads: int = 0,
                 compile: bool = False, graphs: str = "auto") -> None:
        import devices
        from convert_onnx_to_torch import build_torch_model_from_onnx
        from fast_path import TorchEngine

        self.device = devices.select_device(device)
        model = build_torch_model_from_onnx(onnx_path, self.device)
        self.engine = TorchEngine(model, self.device, precision, compile, graphs, threads)
        self.fixed_size: Size | None = None  # any multiple of 32
        self.description = f"PyTorch on {self.device} ({precision}; {self.engine.describe})"

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.engine(x)[:, 0]


class OrtBackend:
    """ONNX Runtime on the CPU, on the ONNX file itself."""

    name = "ort"

    def __init__(self, onnx_path: str, device: str = "cpu", precision: str = "fp32", threads: int = 0,
                 compile: bool = False, graphs: str = "auto") -> None:
        import onnxruntime as ort

        if device not in ("auto", "cpu"):
            raise ValueError(f"the ort backend runs on the CPU; --device {device} needs --backend torch")
        if precision != "fp32":
            raise ValueError(f"the ort backend runs the file as it is; --precision {precision} needs --backend torch")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        static_hw = isinstance(shape[2], int) and isinstance(shape[3], int)
        self.fixed_size = (int(shape[2]), int(shape[3])) if static_hw else None
        self.fixed_batch = int(shape[0]) if isinstance(shape[0], int) else None
        self.description = "ONNX Runtime on the CPU"

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            return np.concatenate([self.infer(x[i : i + 1]) for i in range(x.shape[0])])
        return self.session.run(None, {self.input_name: x})[0][:, 0]


BACKENDS: dict[str, type] = {"torch": TorchBackend, "ort": OrtBackend}
BACKEND_CHOICES = ("auto", *BACKENDS)


def choose_backend(backend: str, device: str) -> tuple[str, str]:
    """``auto``: PyTorch when an accelerator is there (or asked for), ONNX Runtime on a CPU-only machine.

    On a CPU, ONNX Runtime is the faster engine for MODNet (README, benchmark.py
    engines); on an accelerator, PyTorch is the one that uses it. Returns
    (backend, why).
    """
    if backend != "auto":
        return backend, "asked for"
    if device != "auto":  # a device is a PyTorch choice, the CPU included
        return "torch", f"device {device} asked for"
    import devices

    chosen = devices.select_device("auto")
    if chosen.type == "cpu":
        return "ort", "no accelerator found: ONNX Runtime is the faster engine on a CPU"
    return "torch", f"accelerator {chosen} found"


# --------------------------------------------------------------------------
# the API
# --------------------------------------------------------------------------


class Matter:
    """MODNet matting of images (path, bytes, PIL image or numpy array)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL_ID,
        backend: str = "auto",
        device: str = "auto",
        precision: str = "fp32",
        size: int | str = "auto",
        threads: int = 0,
        models_dir: str = DEFAULT_MODELS_DIR,
        sha256: str | None = None,
        offline: bool = False,
        allow_synthetic: bool = False,
        compile: bool = False,
        graphs: str = "auto",
        log: Callable[[str], None] = lambda msg: None,
    ) -> None:
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKEND_CHOICES)}")
        backend, self.backend_reason = choose_backend(backend, device)
        try:
            self.source = resolve_model(model, models_dir, sha256, offline, log=log)
        except ModelSourceError as exc:
            if not allow_synthetic:
                raise
            self.source = synthetic_fallback(models_dir, attempts=exc.attempts)
            log(f"WARNING: {self.source.warning}")
        self.backend = BACKENDS[backend](self.source.path, device, precision, threads, compile, graphs)
        self.size = size

    def model_size(self, height: int, width: int) -> Size:
        """The input size this image is inferred at."""
        if self.backend.fixed_size is not None:
            return self.backend.fixed_size
        if isinstance(self.size, int):
            return short_side_size(height, width, self.size)
        return resolve_size(self.size, height, width)

    def mattes(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Float mattes for uint8 RGB images; images that share a model size run as one batch."""
        groups: dict[Size, list[int]] = defaultdict(list)
        for i, rgb in enumerate(images):
            groups[self.model_size(*rgb.shape[:2])].append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for size, idx in groups.items():
            x = np.stack([normalize(resize_rgb(images[i], size)) for i in idx])
            for i, alpha in zip(idx, self.backend.infer(x)):
                out[i] = matte_to_size(alpha, images[i].shape[:2])
        return out  # type: ignore[return-value]

    def matte(self, image: ImageLike) -> np.ndarray:
        return self.mattes([load_image(image)])[0]

    def cutout(self, image: ImageLike) -> np.ndarray:
        rgb = load_image(image)
        return cutout(rgb, self.mattes([rgb])[0])

    def composite(self, image: ImageLike, background: str | np.ndarray = "white") -> np.ndarray:
        rgb = load_image(image)
        return composite(rgb, self.mattes([rgb])[0], make_background(background, rgb))


def render(mode: str, rgb: np.ndarray, alpha: np.ndarray, background: str | np.ndarray) -> np.ndarray:
    """The array written for one mode."""
    if mode == "matte":
        return to_uint8(alpha)
    if mode == "cutout":
        return cutout(rgb, alpha)
    return composite(rgb, alpha, make_background(background, rgb))


# --------------------------------------------------------------------------
# jobs: what to read and where each output goes
# --------------------------------------------------------------------------


@dataclass
class Job:
    source: str  # a path, or "-" for stdin
    kind: str  # "image" or "video"
    outputs: dict[str, str] = field(default_factory=dict)  # mode -> output path


def _walk(folder: str, recursive: bool, skip: str | None = None) -> Iterator[str]:
    """Files of ``folder`` in a stable order, never descending into ``skip`` (the output folder)."""
    skip = os.path.realpath(skip) if skip else None
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip)
            for name in sorted(files):
                yield os.path.join(root, name)
    else:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                yield path


def plan_jobs(
    inputs: Sequence[str], out_dir: str, modes: Sequence[str], fmt: str, recursive: bool
) -> tuple[list[Job], list[str]]:
    """Jobs with their output paths, and one error line per input that does not exist."""
    found: list[tuple[str, str, str]] = []  # (path, relative output stem, kind)
    errors = []
    for item in inputs:
        if os.path.isdir(item):
            for path in _walk(item, recursive, skip=out_dir):
                ext = os.path.splitext(path)[1].lower()
                if ext in IMAGE_EXTS or ext in VIDEO_EXTS:
                    rel = os.path.relpath(path, item)
                    found.append((path, rel, "video" if ext in VIDEO_EXTS else "image"))
        elif os.path.isfile(item):
            ext = os.path.splitext(item)[1].lower()
            found.append((item, os.path.basename(item), "video" if ext in VIDEO_EXTS else "image"))
        else:
            errors.append(f"{item}: no such file or folder")
    # two inputs with one stem (photo.jpg, photo.png) keep their extension in the name
    stems = defaultdict(int)
    for _, rel, _ in found:
        stems[os.path.splitext(rel)[0]] += 1
    jobs = []
    for path, rel, kind in found:
        stem = os.path.splitext(rel)[0]
        if stems[stem] > 1:
            stem = rel.replace(".", "_")
        job = Job(path, kind)
        for mode in modes:
            if kind == "video":
                ext = "mov" if mode == "cutout" else "mp4"  # ProRes 4444 keeps the alpha channel
            else:
                ext = "png" if mode == "cutout" and fmt == "jpg" else fmt  # JPEG has no alpha
            job.outputs[mode] = os.path.join(out_dir, f"{stem}_{mode}.{ext}")
        jobs.append(job)
    return jobs, errors


def save_output(path: str, array: np.ndarray) -> None:
    from PIL import Image

    img = Image.fromarray(array)
    args = {"quality": 95} if path.lower().endswith((".jpg", ".jpeg", ".webp")) else {}
    if path.lower().endswith(".webp") and array.ndim == 3 and array.shape[2] == 4:
        args = {"lossless": True}
    write_image(path, img, **args)


def _load(job: Job) -> tuple[Job, np.ndarray | None, str | None]:
    try:
        return job, load_image(job.source), None
    except ImageReadError as exc:
        return job, None, str(exc)


def _save_all(job: Job, rgb: np.ndarray, alpha: np.ndarray, background: str) -> str | None:
    try:
        for mode, path in job.outputs.items():
            save_output(path, render(mode, rgb, alpha, background))
    except (OSError, ValueError, ImageReadError) as exc:
        return f"{job.source}: {exc}"
    return None


_IO_POOL: ThreadPoolExecutor | None = None


def _io_map(fn: Callable, items: Sequence) -> list:
    """Decode and encode a batch's images on threads (PIL releases the GIL), one at a time otherwise."""
    global _IO_POOL
    if len(items) < 2:
        return [fn(*item) if isinstance(item, tuple) else fn(item) for item in items]
    if _IO_POOL is None:
        _IO_POOL = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)))
    return list(_IO_POOL.map(lambda item: fn(*item) if isinstance(item, tuple) else fn(item), items))


def process_image_batch(matter: Matter, jobs: Sequence[Job], background: str) -> list[tuple[Job, str | None]]:
    """Read, matte (batched) and write a group of image jobs; returns (job, error or None)."""
    results: list[tuple[Job, str | None]] = []
    loaded = []
    for job, rgb, problem in _io_map(_load, list(jobs)):
        if problem:
            results.append((job, problem))
        else:
            loaded.append((job, rgb))
    if loaded:
        alphas = matter.mattes([rgb for _, rgb in loaded])
        problems = _io_map(_save_all, [(job, rgb, alpha, background) for (job, rgb), alpha in zip(loaded, alphas)])
        results += [(job, problem) for (job, _), problem in zip(loaded, problems)]
    return results


# --------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Portrait matting with MODNet: mattes, cutouts and new backgrounds for photos, folders and videos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders, video files, or - (one image on stdin, PNG on stdout)")
    p.add_argument("-o", "--output-dir", default=None, help="output folder (required unless the input is -)")
    p.add_argument("--mode", action="append", choices=MODES, default=None,
                   help="what to write (repeatable): matte = 8-bit alpha, cutout = RGBA, composite = over --background "
                        "(default: cutout)")
    p.add_argument("--background", default="white", help="composite background: a colour (#00ff00, white), an image file, or blur")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="inference engine; auto = PyTorch on an accelerator, ONNX Runtime on a CPU-only machine")
    p.add_argument("--device", default="auto", help="auto|npu[:N]|cuda[:N]|mps|cpu (torch backend)")
    p.add_argument("--model", default=DEFAULT_MODEL_ID, help="local .onnx path, http(s) URL, or model id")
    p.add_argument("--sha256", default=None, help="expected sha256 of the model file")
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help="download cache")
    p.add_argument("--offline", action="store_true", help="never download")
    p.add_argument("--allow-synthetic", action="store_true",
                   help="when the model cannot be had, use a generated one (meaningless mattes; for testing)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="torch backend precision (half precision runs the decoder, the backbone stays fp32)")
    p.add_argument("--batch", type=int, default=1, help="images (or video frames) of one size inferred together")
    p.add_argument("--size", default="auto",
                   help="model input: auto (MODNet's rule: short side to 512 when larger, sides down to multiples of 32) "
                        "or N (short side to N); a static ONNX graph on ort uses its own size")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--compile", action="store_true", help="torch backend: compile (AOTInductor on CPU/CUDA, cached per input shape; torchair on NPU)")
    p.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                   help="torch backend: capture graphs of repeated shapes on CUDA/NPU")
    p.add_argument("--format", choices=FORMATS, default="png", help="image output format (cutouts stay PNG when jpg is asked)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--temporal", action="store_true", help="video: one-frame-delay smoothing against flicker")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-file messages")
    return p


def _parse_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--size must be auto or a number of pixels, got {text!r}") from None


def _stdin_mode(matter: Matter, mode: str, background: str) -> int:
    data = sys.stdin.buffer.read()
    if not data:
        raise ImageReadError("stdin: no data")
    rgb = load_image(data)
    alpha = matter.mattes([rgb])[0]
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(render(mode, rgb, alpha, background)).save(buf, format="PNG")
    sys.stdout.buffer.write(buf.getvalue())
    sys.stdout.buffer.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = list(dict.fromkeys(args.mode or ["cutout"]))
    err = lambda msg: print(f"error: {msg}", file=sys.stderr)  # noqa: E731
    stdin = args.inputs == ["-"]
    if "-" in args.inputs and not stdin:
        err("- (stdin) cannot be mixed with other inputs")
        return 2
    if stdin and len(modes) != 1:
        err("with - (stdin) give exactly one --mode: stdout takes one PNG")
        return 2
    if not stdin and not args.output_dir:
        err("-o/--output-dir is required")
        return 2
    if args.batch < 1:
        err(f"--batch must be at least 1, got {args.batch}")
        return 2
    quiet = args.quiet or stdin
    info = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    try:
        size = _parse_size(args.size)
        if isinstance(size, int):
            short_side_size(size, size, size)
        if args.background != "blur" and not os.path.exists(args.background):
            from imaging import parse_color

            parse_color(args.background)
        matter = Matter(args.model, args.backend, args.device, args.precision, size, args.threads,
                        args.models_dir, args.sha256, args.offline, args.allow_synthetic, args.compile, args.graphs,
                        log=lambda m: print(m, file=sys.stderr) if not args.quiet else None)
    except ModelSourceError as exc:
        msg = "every download method failed (above)" if exc.attempts and not args.quiet else str(exc)
        if not args.allow_synthetic and (exc.attempts or args.offline):
            msg += "; pass --model PATH to a local .onnx, or --allow-synthetic to test with a generated model"
        err(msg)
        return 1
    except (ValueError, OSError, ImageReadError, DeviceError, FastPathError) as exc:
        # ConversionError and OnnxReadError are ValueErrors
        err(str(exc))
        return 1
    info(f"backend {matter.backend.name} ({matter.backend_reason}): {matter.backend.description}; "
         f"model {matter.source.path} ({matter.source.source})")
    if stdin:
        try:
            return _stdin_mode(matter, modes[0], args.background)
        except (ImageReadError, ValueError) as exc:
            err(str(exc))
            return 1
    return run_jobs(matter, args, modes, info, err)


def run_jobs(matter: Matter, args: argparse.Namespace, modes: list[str], info, err) -> int:
    jobs, missing = plan_jobs(args.inputs, args.output_dir, modes, args.format, args.recursive)
    for line in missing:
        err(line)
    failed, skipped, done, frames = len(missing), 0, 0, 0
    todo = []
    for job in jobs:
        if not args.overwrite and any(os.path.exists(p) for p in job.outputs.values()):
            skipped += 1
            info(f"skipped {job.source}: output exists (use --overwrite)")
        else:
            todo.append(job)
    bar = None
    if not args.quiet and sys.stderr.isatty() and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="file", file=sys.stderr)
    say_error = (lambda m: bar.write(f"error: {m}", file=sys.stderr)) if bar else err
    started = time.perf_counter()
    images = [j for j in todo if j.kind == "image"]
    for i in range(0, len(images), args.batch):
        group = images[i : i + args.batch]
        for _job, problem in process_image_batch(matter, group, args.background):
            if problem:
                failed += 1
                say_error(problem)
            else:
                done += 1
        if bar:
            bar.update(len(group))
    for job in (j for j in todo if j.kind == "video"):
        frame_bar = None

        def start_frames(total: int | None, job: Job = job) -> None:
            nonlocal frame_bar
            if bar is not None:
                from tqdm import tqdm

                frame_bar = tqdm(total=total, unit="frame", desc=os.path.basename(job.source), leave=False,
                                 file=sys.stderr)

        try:
            frames += process_video(matter, job, args.background, args.batch, args.temporal,
                                    on_frames=lambda n: frame_bar.update(n) if frame_bar else None,
                                    on_total=start_frames)
            done += 1
        except (ImageReadError, ValueError, OSError) as exc:
            failed += 1
            say_error(str(exc) if job.source in str(exc) else f"{job.source}: {exc}")
        finally:
            if frame_bar is not None:
                frame_bar.close()
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    elapsed = max(time.perf_counter() - started, 1e-9)
    rate = (len(images) + frames) / elapsed
    if not args.quiet:
        print(f"done: {done} succeeded, {failed} failed, {skipped} skipped; {rate:.2f} images/s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
