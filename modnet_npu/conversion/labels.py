"""What the converter matches on, and how it fails.

A *label* says what a weight-carrying layer is, structurally (kind, channels,
kernel, stride, groups): both sides of the conversion, the ONNX graph's units
and the PyTorch model's, are labelled alike and matched on it. Names never
enter: exporters rename and reorder.
"""
from __future__ import annotations

from typing import NamedTuple, Union

from modnet_npu.errors import ModnetError

INPUT = "<input>"  # the image input, as a predecessor of the first layers


class ConversionError(ModnetError, ValueError):
    """The graph cannot be mapped onto MODNet; the message names the op or tensor."""



class ConvLabel(NamedTuple):
    """What a convolution is, structurally: the key both sides are matched on."""

    kind: str  # "conv"
    out_channels: int
    in_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    groups: int


class BnLabel(NamedTuple):
    kind: str  # "bn"
    channels: int


class LinearLabel(NamedTuple):
    kind: str  # "linear"
    in_features: int
    out_features: int


Label = Union[ConvLabel, BnLabel, LinearLabel]


def describe(label: Label) -> str:
    """A label as a person reads it, e.g. 'Conv 1280->96 5x5 stride 1'."""
    if isinstance(label, ConvLabel):
        s = label.stride_h if label.stride_h == label.stride_w else (label.stride_h, label.stride_w)
        grp = f" groups {label.groups}" if label.groups != 1 else ""
        return f"Conv {label.in_channels}->{label.out_channels} {label.kernel_h}x{label.kernel_w} stride {s}{grp}"
    if isinstance(label, BnLabel):
        return f"BatchNorm {label.channels}"
    return f"Linear {label.in_features}->{label.out_features}"

