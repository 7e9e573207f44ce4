"""State-dict files: what the converter's command line writes, and the checkpoint suffixes it reads."""
from __future__ import annotations

import torch
from torch import nn

from modnet_npu.fileio import atomic_path

CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors")


def save_state_dict(model: nn.Module, out_path: str) -> None:
    """Write ``model.state_dict()`` as .pt or .safetensors, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_path) as tmp:
        if out_path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, tmp)
        else:
            torch.save(state, tmp)
