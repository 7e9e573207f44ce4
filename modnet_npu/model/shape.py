"""MODNet's input shape rule, without torch: what the image code needs to know of the network.

``modnet_npu.model.modnet`` re-exports it; the image code imports it from here,
so resizing and size rules do not load torch (the ONNX Runtime and OpenVINO
paths never need it).
"""
from __future__ import annotations

SIZE_MULTIPLE = 32  # the backbone downsamples five times: height and width must be multiples of 32
