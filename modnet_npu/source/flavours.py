"""The flavours of generated MODNet ONNX file and the default weight seed (``source.synthetic`` makes them).

Kept apart from the generator, which imports torch and onnx, so ``synthetic_model.py``
offers them as choices and defaults without loading either.
"""
from __future__ import annotations

DEFAULT_SEED = 0

# each imitates a kind of real copy (the table in source.synthetic's docstring)
FLAVOURS: tuple[str, ...] = (
    "webnn", "official", "opset17", "dynamo", "simplified", "fp16", "anonymous", "ort", "ort_extended",
)
