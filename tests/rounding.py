"""Bounds on float32 rounding, derived from the computation instead of one machine's result.

Two float32 evaluations of the same graph that sum in different orders (fused or blocked kernels,
other SIMD widths: AVX2 on one CPU, AVX-512/AMX on another) differ by their rounding errors alone.
Under the usual random-rounding model, a float32 sum of n products at scale s is off by about
``eps32 * s * sqrt(n)``; the errors of successive layers add in quadrature, so a graph's output is
off by about ``eps32 * s * sqrt(N)`` with N the products summed in all its reductions.
"""
from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23, about 1.19e-7

# Two evaluations each off by ~eps*s*sqrt(N) differ by up to twice that; the maximum over every
# element of a tensor (65,536 at 256x256) lies in the tail of that spread: another factor 2.
TWO_EVALUATIONS = 4.0


def reduction_lengths(model) -> list[int]:
    """Products summed per output element by each Conv, MatMul and Gemm of an ONNX ``model``
    whose weight is an initializer (in channels per group x kernel height x kernel width)."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    lengths = []
    for node in model.graph.node:
        dims = weights.get(node.input[1]) if len(node.input) > 1 else None
        if not dims:
            continue
        if node.op_type == "Conv":
            lengths.append(math.prod(dims[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            transposed = any(a.name == "transB" and a.i for a in node.attribute)
            lengths.append(dims[-1] if transposed else dims[0])
    return lengths


def graph_rounding_bound(model, output: np.ndarray, k: float = TWO_EVALUATIONS) -> float:
    """How far two float32 evaluations of ``model`` may put ``output`` apart by rounding alone:
    ``k * eps32 * max|output| * sqrt(total reduction length)``."""
    total = sum(reduction_lengths(model))
    assert total > 0, "the graph has no convolution or matrix product to bound"
    return k * EPS32 * float(np.abs(output).max()) * math.sqrt(total)
