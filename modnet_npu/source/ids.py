"""What every model source shares, torch- and network-free: the default model id and file, and the
errors of finding a model (``resolve`` re-exports them; ``package_index`` uses them without importing
``resolve``, which imports it)."""
from __future__ import annotations

from modnet_npu.errors import ModnetError

DEFAULT_MODEL_ID = "onnx-community/modnet-webnn"
MODEL_FILE = "onnx/model.onnx"


class ModelSourceError(ModnetError, RuntimeError):
    """The model could not be found, downloaded or verified; the message says which."""

    def __init__(self, message: str, attempts: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.attempts = attempts


class ChecksumError(ModelSourceError):
    """A file whose sha256 is not the one expected: final, never retried or replaced."""
