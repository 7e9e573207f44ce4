"""What a pipeline run can be told (:class:`Options`) and its defaults, without torch.

``run_npu_inference.py`` builds its parser from these defaults, so ``--help`` and a
bad option are answered before the pipeline (``proof.pipeline``) imports torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from modnet_npu import DEFAULT_IMAGE, REPO_ROOT
from modnet_npu.model.precision import MAX_ERROR_THRESHOLD
from modnet_npu.runtime.options import EngineOptions

DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "output")
# The pipeline's engine defaults: the generated model stands in when the default id cannot be downloaded
# (announced in a banner and in the report).
ENGINE_DEFAULTS = EngineOptions(allow_synthetic=True)


@dataclass(frozen=True)
class Options:
    """Everything a run can be told; the command line's defaults come from here.

    ``engine``: the model, device, precision, model form, threads and fast path
    (``runtime.options``, shared with every tool). The PyTorch side always runs
    with ``strict_fp32`` (a parity run); ``engine.backend``, ``engine.size`` and
    ``engine.max_side`` do not apply (both engines run; ``size``/``sizes`` below).
    """

    engine: EngineOptions = ENGINE_DEFAULTS
    image: str = DEFAULT_IMAGE
    images: tuple[str, ...] = ()  # parity images (files); empty: ``image`` alone
    image_dirs: tuple[str, ...] = ()  # folders whose images join the parity run
    size: str | None = None  # auto, N (short side) or HxW; None: the file's own, else DEFAULT_SIZES
    sizes: tuple[str, ...] = ()  # several sizes for a dynamic file (each as --size)
    alphas: str | None = None  # folder of ground-truth alpha mattes, matched by file stem
    layerwise: bool = False  # layer-by-layer comparison (also run once when parity fails)
    layer_threshold: float | None = None  # None: layerwise.LAYER_THRESHOLDS[precision]
    runs: int = 20
    warmup: int = 3
    batch_sizes: tuple[int, ...] = (1, 8)
    mae_threshold: float | None = None  # None: MAE_THRESHOLDS[precision]
    max_threshold: float = MAX_ERROR_THRESHOLD
    output_dir: str = DEFAULT_OUTPUT
    timeout: float = 30.0
    retries: int = 3
    routes: tuple[str, ...] = ("torch",)  # routes side by side (modnet_npu.routes); torch alone: the run as it was
    soc_version: str | None = None  # ATC's --soc_version for the om route; None: read from the device
    route_precision: str = "fp32"  # fp32 kept on every route, or "native": each route's own default (fp16)
    log: Callable[[str], None] = field(default=print, compare=False)
