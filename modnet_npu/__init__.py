"""modnet-npu: MODNet from its ONNX file to a faithful PyTorch model on NPU, CUDA, MPS and CPU.

Sub-packages by role (see ARCHITECTURE.md): ``graph`` (reading ONNX files),
``conversion`` (ONNX -> PyTorch), ``model`` (MODNet and its forms), ``source``
(where model files come from), ``runtime`` (devices, engines, process set-up),
``matting`` (images, jobs, video, Ray), ``service`` (HTTP), ``proof`` (parity,
benchmarks' timing, reports) and ``bench`` (benchmark suites).

Importing the package imports nothing heavy: torch is loaded only by the modules that need it.
"""
from __future__ import annotations

import os

# The checkout this package runs from: the command lines, assets/, models/ and output/ live here.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS_DIR = os.path.join(REPO_ROOT, "assets")
DEFAULT_IMAGE = os.path.join(ASSETS_DIR, "portrait_astronaut.jpg")
