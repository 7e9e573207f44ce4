"""The matting API: MODNet mattes, cutouts and composites of images, on either engine.

    from inference import Matter          # (re-exported there, as the README shows)
    matter = Matter(backend="auto", device="auto", allow_synthetic=True)
    alpha = matter.matte("photo.jpg")     # float32 (H, W) in [0, 1], original size
    rgba = matter.cutout(pil_image)       # uint8 (H, W, 4)
    rgb = matter.composite(array, "blur") # uint8 (H, W, 3)

Images that share a model input size are inferred as one batch (:meth:`Matter.mattes`); on a fast path
made per shape (compiled, graph capture) the engine pads each batch up to one of a few batch sizes
(``TorchEngine``), which :meth:`Matter.warm_up` prepares before any request.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np

from modnet_npu.errors import ModnetError
from modnet_npu.runtime.engines import choose_backend, open_engine
from modnet_npu.runtime.options import EngineOptions
from modnet_npu.matting.imaging import (
    ImageLike,
    Size,
    SizeSpec,
    composite,
    cutout,
    input_size,
    load_image,
    make_background,
    matte_to_size,
    model_input,
    to_uint8,
)
from modnet_npu.source.resolve import resolve_or_fallback

MODES = ("matte", "cutout", "composite")


class NonFiniteMatteError(ModnetError, ValueError):
    """The model's output holds NaN or Inf (broken weights, a half-precision overflow): no matte to write.

    Checked on the raw output, before resizing and clipping would turn Inf into a plausible 0 or 1.
    """


class Matter:
    """MODNet matting of images (path, bytes, PIL image or numpy array).

    Opened from :class:`options.EngineOptions`, given whole (``Matter(options)``)
    or as its fields, by keyword (``Matter(model="m.onnx", size=512)``; both:
    the keywords replace the object's fields). ``size`` is ``"auto"`` (MODNet's
    rule), an int, ``"N"`` or :class:`imaging.ShortSide` (the short side), or
    ``(height, width)``; a static ONNX graph on ONNX Runtime always takes its own
    size, and no side may exceed ``max_side``. ``allow_synthetic`` lets the
    default model id fall back to the generated model when nothing can be
    downloaded (mattes then mean nothing; for testing). ``strict_fp32`` turns
    HF32 (Ascend) / TF32 (CUDA) off. ``validate=False`` skips the model file's
    check (``engines.check_model``) where a caller did it already.
    """

    def __init__(self, options: EngineOptions | None = None, /, *, log: Callable[[str], None] = lambda msg: None,
                 validate: bool = True, **fields: Any) -> None:
        if options is not None and not isinstance(options, EngineOptions):
            raise TypeError(f"Matter takes an EngineOptions or keyword arguments (model=..., backend=...), "
                            f"not a {type(options).__name__}")
        options = replace(options or EngineOptions(), **fields) if fields else options or EngineOptions()
        self.options = options
        backend, self.backend_reason = choose_backend(options.backend, options.device, options.precision)
        self.source = resolve_or_fallback(options.model, options.models_dir, allow_synthetic=options.allow_synthetic,
                                          sha256=options.sha256, offline=options.offline, log=log)
        if self.source.warning:
            log(f"WARNING: {self.source.warning}")
        self.engine = open_engine(backend, self.source.path, options, validate=validate, log=log)

    @property
    def size(self) -> SizeSpec:
        """The model input size asked for (parsed): ``options.size``."""
        return self.options.size

    @property
    def max_side(self) -> int:
        return self.options.max_side

    @property
    def backend(self):
        """The engine (older name, kept for existing callers)."""
        return self.engine

    def model_size(self, height: int, width: int, *, size: SizeSpec | None = None) -> Size:
        """The input size an image of ``height`` x ``width`` is inferred at: under ``size`` when given (a
        request's own), else the options' size; never a side over ``max_side``. ValueError otherwise,
        also when ``size`` is asked of a model file whose input size is fixed."""
        fixed = self.engine.fixed_size
        if fixed is not None and size is not None:
            raise ValueError(f"this model file takes {fixed[0]}x{fixed[1]} only on the {self.engine.name} backend")
        if fixed is not None:
            return fixed
        return input_size(self.size if size is None else size, height, width, max_side=self.max_side)

    def infer_batch(self, images: Sequence[np.ndarray], size: Size) -> list[np.ndarray]:
        """Float mattes, at each image's own size, for uint8 RGB images all inferred at model input ``size``."""
        x = np.stack([model_input(rgb, size) for rgb in images])
        raw = self.engine.infer(x)
        if not np.isfinite(raw).all():
            raise NonFiniteMatteError("the model produced NaN or Inf values, not a matte (is the model file broken?)")
        return [matte_to_size(alpha, rgb.shape[:2]) for rgb, alpha in zip(images, raw)]

    def warm_up(self, sizes: Sequence[Size] | None = None, *, max_batch: int = 8) -> None:
        """Get the engine ready for batches of up to ``max_batch`` images at each model input size in
        ``sizes`` (default: the size a 512x512 image gets) before any request comes.

        On PyTorch with a fast path made per shape (``compile``, graph capture) this
        compiles or captures every batch of the engine's set at those sizes and
        seals it (``TorchEngine.warm_up``): later batches are padded up to a
        prepared one, and a shape outside the set runs eagerly instead of waiting
        for a compiler. Otherwise it runs the first forwards (one image, then two).
        """
        sizes = list(sizes) if sizes is not None else [self.model_size(512, 512)]
        warm = getattr(self.engine, "warm_up", None)
        if warm is not None:
            warm(sizes, max_batch=max_batch)
            return
        for size in sizes:
            gray = np.full((*size, 3), 128, np.uint8)
            for n in sorted({1, min(2, max_batch)}):
                self.infer_batch([gray] * n, size)

    def mattes(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Float mattes for uint8 RGB images; images that share a model size run as one batch."""
        groups: dict[Size, list[int]] = defaultdict(list)
        for i, rgb in enumerate(images):
            groups[self.model_size(*rgb.shape[:2])].append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for size, idx in groups.items():
            for i, alpha in zip(idx, self.infer_batch([images[i] for i in idx], size)):
                out[i] = alpha
        return out  # type: ignore[return-value]

    def matte(self, image: ImageLike) -> np.ndarray:
        return self.mattes([load_image(image)])[0]

    def cutout(self, image: ImageLike) -> np.ndarray:
        rgb = load_image(image)
        return cutout(rgb, self.mattes([rgb])[0])

    def composite(self, image: ImageLike, background: str | np.ndarray | tuple[int, int, int] = "white") -> np.ndarray:
        rgb = load_image(image)
        return composite(rgb, self.mattes([rgb])[0], make_background(background, rgb))

    def close(self) -> None:
        """Release the engine's worker threads."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Matter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def render(mode: str, rgb: np.ndarray, alpha: np.ndarray,
           background: str | np.ndarray | tuple[int, int, int]) -> np.ndarray:
    """The array written for one mode; ``background`` as :func:`imaging.make_background` takes it (a colour
    stays a colour: never an array of the image's size)."""
    if mode == "matte":
        return to_uint8(alpha)
    if mode == "cutout":
        return cutout(rgb, alpha)
    if mode == "composite":
        return composite(rgb, alpha, make_background(background, rgb))
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
