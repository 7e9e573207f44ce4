"""The pipeline's figures: ``comparison.png`` (input, both mattes, error map)
and ``benchmark.png`` (latencies). Pure: data in, PIL image out.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from imaging import to_uint8


def _heat(err: np.ndarray, scale: float) -> np.ndarray:
    """Black -> red -> yellow -> white as the error goes 0 -> ``scale``."""
    v = np.clip(err / scale, 0, 1)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def comparison_figure(image: np.ndarray, ort_matte: np.ndarray, dev_matte: np.ndarray, dev_label: str):
    from PIL import Image, ImageDraw

    err = np.abs(ort_matte.astype(np.float64) - dev_matte.astype(np.float64))
    scale = max(1e-6, 10 ** math.ceil(math.log10(max(err.max(), 1e-6))))
    h, w = image.shape[:2]
    panels = [
        ("input", image),
        ("ONNX Runtime CPU", np.repeat(to_uint8(ort_matte)[..., None], 3, 2)),
        (f"PyTorch {dev_label}", np.repeat(to_uint8(dev_matte)[..., None], 3, 2)),
        (f"|error|, white = {scale:g}", _heat(err, scale)),
    ]
    pad, top = 8, 22
    canvas = Image.new("RGB", (len(panels) * (w + pad) + pad, h + top + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, arr) in enumerate(panels):
        x = pad + i * (w + pad)
        canvas.paste(Image.fromarray(arr), (x, top))
        draw.text((x, 5), title, fill="black")
    return canvas


def benchmark_figure(bars: Sequence[tuple[str, float]], title: str):
    from PIL import Image, ImageDraw

    width, row, left = 640, 34, 170
    canvas = Image.new("RGB", (width, 40 + row * len(bars) + 10), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 10), title, fill="black")
    top = max(v for _, v in bars) or 1.0
    colours = ["#888888", "#d9480f", "#1c7ed6", "#2b8a3e"]
    for i, (label, value) in enumerate(bars):
        y = 40 + i * row
        length = int((width - left - 90) * value / top)
        draw.text((10, y + 8), label, fill="black")
        draw.rectangle([left, y + 4, left + max(length, 1), y + row - 8], fill=colours[i % len(colours)])
        draw.text((left + length + 6, y + 8), f"{value:.2f} ms", fill="black")
    return canvas
