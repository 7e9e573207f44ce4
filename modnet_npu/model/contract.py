"""What MODNet asks of its input, as plain numbers: importable without torch.

``model.modnet`` (the network), ``matting.imaging`` (sizes of real images),
``runtime.options`` (the engine options every tool parses) and the service all
read these, so that none of them copies a number to avoid importing torch.
"""
from __future__ import annotations

SIZE_MULTIPLE = 32  # the backbone downsamples five times: each input side is a multiple of 2**5
# The largest model input side accepted by default: MODNet's activations at 4096x4096
# already take several GB; an unbounded --size grows until the kernel kills the process.
MAX_MODEL_SIDE = 4096
