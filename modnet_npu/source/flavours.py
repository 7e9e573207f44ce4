"""The flavours of generated MODNet ONNX file and the default weight seed (``source.synthetic`` makes them).

Kept apart from the generator, which imports torch and onnx, so ``synthetic_model.py``
offers them as choices and defaults, and refuses a request that cannot be met
(:func:`check_generate`), without loading either.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

from modnet_npu.errors import ModnetError

DEFAULT_SEED = 0

# each imitates a kind of real copy (the table in source.synthetic's docstring)
FLAVOURS: tuple[str, ...] = (
    "webnn", "official", "opset17", "dynamo", "simplified", "fp16", "anonymous", "ort", "ort_extended",
)

# what each flavour imports beyond torch and onnx; the fallback's flavour (official,
# source.synthetic.FALLBACK_FLAVOUR) and webnn need nothing outside requirements.txt
FLAVOUR_PACKAGES: dict[str, tuple[str, ...]] = {
    "dynamo": ("onnxscript",),  # torch.onnx's dynamo exporter
    "simplified": ("onnxslim",),
    "ort": ("onnxruntime",),
    "ort_extended": ("onnxruntime",),
}


class MissingPackageError(ModnetError, ImportError):
    """A requested flavour needs a package that is not installed."""


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check_flavours(flavours: Sequence[str]) -> None:
    """Every flavour known and its packages installed, checked before anything is written.

    Without this, a missing optional package surfaced as a traceback after a
    few files had already been exported.
    """
    unknown = [f for f in flavours if f not in FLAVOURS]
    if unknown:
        raise ValueError(f"unknown flavour {unknown[0]!r}; choose from {', '.join(FLAVOURS)}")
    missing: dict[str, list[str]] = {}
    for flavour in dict.fromkeys(flavours):
        for package in FLAVOUR_PACKAGES.get(flavour, ()):
            if not _installed(package):
                missing.setdefault(package, []).append(flavour)
    if missing:
        needs = "; ".join(f"{', '.join(fl)} needs {pkg}" for pkg, fl in missing.items())
        raise MissingPackageError(f"flavour {needs}: pip install {' '.join(missing)} "
                                  "(or pip install -r requirements-dev.txt); nothing was written")


def check_generate(out_dir: str, flavours: Sequence[str]) -> None:
    """What ``source.synthetic.generate`` checks before it writes anything: the flavours
    (:func:`check_flavours`), then that ``out_dir`` is not a file. Torch-free, so the command
    line refuses a bad request in a fraction of a second, not after the generator's imports."""
    check_flavours(flavours)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir}: is a file, not a folder")
