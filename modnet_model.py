"""MODNet in PyTorch, top-down like the paper's figure, with the official module names.

The model lives in ``modnet_npu.model.modnet`` (its optimized form beside it, in
``modnet_npu.model.optimized``); this file keeps the brief's import path::

    from modnet_model import MODNet, load_checkpoint
"""
from __future__ import annotations

from modnet_npu.model.modnet import (INSTANCE_NORM_EPS, SIZE_MULTIPLE, CheckpointError, Conv2dIBNormRelu, FusionBranch,
                                     HRBranch, IBNorm, LRBranch, MobileNetV2Backbone, MODNet, MODNetConfig, SEBlock,
                                     check_input_size, instance_norm, load_checkpoint, remap_official_state_dict)

__all__ = ["INSTANCE_NORM_EPS", "SIZE_MULTIPLE", "CheckpointError", "Conv2dIBNormRelu", "FusionBranch", "HRBranch",
           "IBNorm", "LRBranch", "MobileNetV2Backbone", "MODNet", "MODNetConfig", "SEBlock", "check_input_size",
           "instance_norm", "load_checkpoint", "remap_official_state_dict"]
