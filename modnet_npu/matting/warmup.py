"""Warm-up for a run: the model input shapes a job needs, worked out before any pixel is decoded, and a
Matter made ready for exactly those before its first batch.

With a fast path made per input shape (``--compile``, graph capture) a shape first met inside a batch is
compiled or captured there, and the batch waits for it. So before a run (``jobs.run_jobs``; on Ray, each
actor's constructor, with the plan its driver made) each input's dimensions are read from its header (an
image's, its EXIF orientation applied as ``imaging.load_image`` applies it; a video stream's), turned into
model input sizes by the rule the Matter applies (``Matter.model_size``), and :meth:`Matter.warm_up`
prepares those sizes at every batch of the run's set and seals it: a shape outside the set (an input whose
header was misleading) then runs eagerly, never compiled inside a batch. An engine that takes any shape as
it comes (eager, ONNX Runtime, OpenVINO) is not warmed: it has nothing to prepare.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from modnet_npu.matting.imaging import Size, input_size
from modnet_npu.matting.plan import Job, is_regular_file

# Sizes prepared for one run, the most used first; the rarer ones run eagerly. Every size costs one
# compilation or capture per batch of the set (up to four), and a compilation (tens of seconds: issue 19's
# compiled service on a CPU took 65 s to be ready) costs far more than the forwards a rarely seen size
# saves; eight sizes cover a folder of photos from a few cameras (two sizes each: landscape and portrait).
MAX_PREPARED_SIZES = 8
_ORIENTATION = 0x0112  # EXIF Orientation; 5 to 8 turn the picture a quarter: height and width swap


@dataclass(frozen=True)
class ShapePlan:
    """What a run prepares: ``sizes`` (model input sizes, the most used first) at every batch of up to
    ``max_batch`` images; ``eager``: sizes it also needs that run eagerly (beyond :data:`MAX_PREPARED_SIZES`)."""

    sizes: tuple[Size, ...]
    max_batch: int
    eager: tuple[Size, ...] = ()

    def describe(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes) or "no size"
        return f"batches of up to {self.max_batch} at {sizes}"


def _header(path: str) -> tuple[int, int, bool] | None:
    """(width, height, turned by its EXIF orientation) from the image's header; None when unreadable."""
    from PIL import Image

    if not is_regular_file(path):
        return None
    try:
        with Image.open(path) as img:
            return img.width, img.height, img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def image_dimensions(path: str) -> tuple[int, int] | None:
    """(height, width) of the image as ``load_image`` will give it, from its header; None when unreadable
    (loading reports why). An EXIF orientation that turns the picture swaps them."""
    header = _header(path)
    if header is None:
        return None
    width, height, turned = header
    return (width, height) if turned else (height, width)


def pixel_count(path: str) -> int:
    """The image's pixel count from its header (no decoding); 0 when unreadable (loading reports why)."""
    header = _header(path)
    return 0 if header is None else header[0] * header[1]


def video_dimensions(path: str) -> tuple[tuple[int, int], int] | None:
    """((height, width) of the frames, frame count or 0 when the container does not say) of a video's
    first video stream, as ``video.process_video`` decodes it; None when it cannot be opened."""
    import av

    try:
        with av.open(path) as src:
            if not src.streams.video:
                return None
            vs = src.streams.video[0]
            return (vs.codec_context.height, vs.codec_context.width), int(vs.frames or 0)
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def _inputs(job: Job, batch: int,
            image_dims: Callable[[str], tuple[int, int] | None]) -> tuple[tuple[int, int], int] | None:
    """(height, width) and how many images of that size the job infers: 1 for an image, the frames of a video."""
    if job.kind == "video":
        found = video_dimensions(job.source)
        # a container that does not count its frames is taken to fill whole batches
        return None if found is None else (found[0], found[1] or batch)
    dims = image_dims(job.source)
    return None if dims is None else (dims, 1)


def shape_plan(jobs: Sequence[Job], model_size: Callable[[int, int], Size], batch: int, *,
               limit: int = MAX_PREPARED_SIZES, mapper: Callable[..., Iterable] = map,
               image_dims: Callable[[str], tuple[int, int] | None] = image_dimensions) -> ShapePlan:
    """The shapes ``jobs`` need: their model input sizes (``model_size(height, width)``, the Matter's rule)
    the most used first, and the largest batch of one size they can form (``batch``, or fewer when no size
    has that many inputs). Headers are read through ``mapper`` (a pool's map reads them in parallel), an
    image's by ``image_dims`` (the dimensions a caller has read already, by path); an input that cannot be
    read or is too large for the model is left out (it fails alone when its turn comes)."""
    counts: Counter[Size] = Counter()
    for found in mapper(lambda job: _inputs(job, batch, image_dims), list(jobs)):
        if found is None:
            continue
        (height, width), n = found
        try:
            counts[model_size(height, width)] += n
        except ValueError:
            continue
    ranked = [size for size, _ in counts.most_common()]  # equal counts keep the order first met
    kept = ranked[:limit]
    most = max((counts[s] for s in kept), default=1)
    return ShapePlan(tuple(kept), max(1, min(batch, most)), tuple(ranked[limit:]))


def prepares_per_shape(matter) -> bool:
    """Whether ``matter``'s engine has a fast path made per shape (it pads batches up to a set of sizes)."""
    return bool(getattr(getattr(matter, "engine", None), "batch_sizes", ()))


def prepare(matter, plan: ShapePlan | None) -> str | None:
    """Warm ``matter`` up for ``plan`` (:meth:`Matter.warm_up`, which seals the set) when its engine has a
    fast path made per shape. The line saying what was prepared and what it cost, or None when nothing was."""
    if plan is None or not plan.sizes or not prepares_per_shape(matter):
        return None
    matter.warm_up(list(plan.sizes), max_batch=plan.max_batch)
    shape_set = getattr(matter.engine, "shape_set", lambda: None)
    line = shape_set() or f"{plan.describe()} prepared"
    if plan.eager:
        line += f"; {len(plan.eager)} rarer model size(s) run eagerly"
    return line


def size_rule(options) -> Callable[[int, int], Size]:
    """:meth:`Matter.model_size` for a driver that opens no model (``options.EngineOptions``): the rule it
    applies on every engine with a fast path made per shape (none of them has a fixed input size)."""
    return lambda height, width: input_size(options.size, height, width, max_side=options.max_side)


def plan_for(matter, jobs: Sequence[Job], batch: int, *, mapper: Callable[..., Iterable] = map) -> ShapePlan | None:
    """The plan of ``jobs`` under ``matter``'s own size rule, or None (no header read) when its engine
    takes any shape as it comes."""
    if not prepares_per_shape(matter):
        return None
    return shape_plan(jobs, matter.model_size, batch, mapper=mapper)

