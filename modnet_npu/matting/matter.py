"""The matting API: MODNet mattes, cutouts and composites of images, on either engine.

    from inference import Matter          # (re-exported there, as the README shows)
    matter = Matter(backend="auto", device="auto", allow_synthetic=True)
    alpha = matter.matte("photo.jpg")     # float32 (H, W) in [0, 1], original size
    rgba = matter.cutout(pil_image)       # uint8 (H, W, 4)
    rgb = matter.composite(array, "blur") # uint8 (H, W, 3)

Images that share a model input size are inferred as one batch (:meth:`Matter.mattes`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from modnet_npu.runtime.engines import choose_backend, open_engine
from modnet_npu.matting.imaging import (
    MAX_MODEL_SIDE,
    ImageLike,
    ShortSide,
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
from modnet_npu.source.resolve import DEFAULT_MODEL_ID, DEFAULT_MODELS_DIR, resolve_or_fallback

MODES = ("matte", "cutout", "composite")


class Matter:
    """MODNet matting of images (path, bytes, PIL image or numpy array).

    ``size``: ``"auto"`` (MODNet's rule), an int or :class:`imaging.ShortSide`
    (the short side), or ``(height, width)``; a static ONNX graph on ONNX Runtime
    always takes its own size, and no side may exceed ``max_side``. ``allow_synthetic`` lets the default model id fall
    back to the generated model when nothing can be downloaded (mattes then mean
    nothing; for testing). ``strict_fp32`` turns HF32 (Ascend) / TF32 (CUDA) off.
    ``validate=False`` skips the model file's MODNet check (a caller that did it already).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL_ID,
        backend: str = "auto",
        device: str = "auto",
        precision: str = "fp32",
        size: int | SizeSpec = "auto",
        threads: int = 0,
        models_dir: str = DEFAULT_MODELS_DIR,
        sha256: str | None = None,
        offline: bool = False,
        allow_synthetic: bool = False,
        compile: bool = False,
        graphs: str = "auto",
        log: Callable[[str], None] = lambda msg: None,
        *,
        strict_fp32: bool = False,
        max_side: int = MAX_MODEL_SIDE,
        validate: bool = True,
    ) -> None:
        backend, self.backend_reason = choose_backend(backend, device)
        self.source = resolve_or_fallback(model, models_dir, allow_synthetic=allow_synthetic, sha256=sha256,
                                          offline=offline, log=log)
        if self.source.warning:
            log(f"WARNING: {self.source.warning}")
        self.engine = open_engine(backend, self.source.path, device=device, precision=precision, threads=threads,
                                  compile=compile, graphs=graphs, log=log, strict_fp32=strict_fp32, validate=validate)
        self.size: SizeSpec = ShortSide(size) if isinstance(size, int) else size
        self.max_side = max_side

    @property
    def backend(self):
        """The engine (older name, kept for existing callers)."""
        return self.engine

    def model_size(self, height: int, width: int) -> Size:
        """The input size this image is inferred at."""
        if self.engine.fixed_size is not None:
            return self.engine.fixed_size
        return input_size(self.size, height, width, max_side=self.max_side)

    def infer_batch(self, images: Sequence[np.ndarray], size: Size) -> list[np.ndarray]:
        """Float mattes, at each image's own size, for uint8 RGB images all inferred at model input ``size``."""
        x = np.stack([model_input(rgb, size) for rgb in images])
        return [matte_to_size(alpha, rgb.shape[:2]) for rgb, alpha in zip(images, self.engine.infer(x))]

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

    def composite(self, image: ImageLike, background: str | np.ndarray = "white") -> np.ndarray:
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


def render(mode: str, rgb: np.ndarray, alpha: np.ndarray, background: str | np.ndarray) -> np.ndarray:
    """The array written for one mode."""
    if mode == "matte":
        return to_uint8(alpha)
    if mode == "cutout":
        return cutout(rgb, alpha)
    if mode == "composite":
        return composite(rgb, alpha, make_background(background, rgb))
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
