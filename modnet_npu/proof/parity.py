"""Parity over many images and sizes: ONNX Runtime against the PyTorch engine,
image by image, with an aggregate verdict and, when ground-truth alpha mattes are
given, the matting metrics of both engines against them.

The pipeline's single-portrait run is the one-case special case of this.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from modnet_npu.runtime.engines import Engine
from modnet_npu.errors import ModnetError
from modnet_npu.matting.imaging import Size, SizeSpec, input_size, load_image, matte_to_size, model_input, resize_rgb
from modnet_npu.matting.imaging import to_uint8
from modnet_npu.matting.jobs import IMAGE_EXTS
from modnet_npu.proof.report import ErrorMetrics, error_metrics


class ParityInputError(ModnetError, ValueError):
    """A folder with no images, or an option that does not fit the model file."""


@dataclass(frozen=True)
class Case:
    """One image at one model input size."""

    path: str
    rgb: np.ndarray
    size: Size


@dataclass(frozen=True)
class Thresholds:
    mae: float
    max_error: float


@dataclass(frozen=True)
class CaseResult:
    case: Case
    model_rgb: np.ndarray  # the image as fed to the model
    x: np.ndarray  # the model input, batch 1
    ort_matte: np.ndarray  # float, model size
    torch_matte: np.ndarray
    floats: ErrorMetrics
    png: ErrorMetrics
    passed: bool
    ground_truth: dict | None = None  # {"alpha": path, "ort": scores, "torch": scores}

    def to_dict(self) -> dict:
        """The report's ``accuracy.per_image`` entry."""
        out = {"path": self.case.path, "size": list(self.case.size), "mae": self.floats.mae,
               "max_error": self.floats.max_error, "psnr_db": self.floats.psnr_db, "passed": self.passed}
        if self.ground_truth is not None:
            out["ground_truth"] = self.ground_truth
        return out


def list_images(paths: Sequence[str], folders: Sequence[str]) -> list[str]:
    """The images named, then every image file of each folder (sorted); ParityInputError for an empty folder."""
    found = list(paths)
    for folder in folders:
        if not os.path.isdir(folder):
            raise ParityInputError(f"--images {folder}: not a folder")
        inside = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                        if os.path.splitext(n)[1].lower() in IMAGE_EXTS)
        if not inside:
            raise ParityInputError(f"--images {folder}: no images found")
        found += inside
    return found


def plan_cases(paths: Sequence[str], *, fixed: Size | None, specs: Sequence[SizeSpec]) -> list[Case]:
    """Each image at each size: the file's fixed size, else each of ``specs`` (MODNet's rule when none)."""
    cases = []
    for path in paths:
        rgb = load_image(path)
        sizes = [fixed] if fixed is not None else [input_size(s, *rgb.shape[:2]) for s in (specs or ["auto"])]
        for size in dict.fromkeys(sizes):  # one case per distinct size
            cases.append(Case(path, rgb, size))
    return cases


def run_case(case: Case, ort: Engine, torch_engine: Engine, bounds: Thresholds) -> CaseResult:
    """Both engines on one case; the verdict against ``bounds``."""
    model_rgb = resize_rgb(case.rgb, case.size)
    x = model_input(case.rgb, case.size)[None]  # as inference feeds it (resampled before rounding)
    ort_out = ort.infer(x)[0]
    dev_out = torch_engine.infer(x)[0]
    floats = error_metrics(ort_out, dev_out)
    png = error_metrics(to_uint8(ort_out) / 255.0, to_uint8(dev_out) / 255.0)
    passed = floats.mae < bounds.mae and floats.max_error < bounds.max_error
    return CaseResult(case, model_rgb, x, ort_out, dev_out, floats, png, passed)


def ground_truths(cases: Sequence[Case], alphas_dir: str | None) -> dict[str, str]:
    """Each photo's ground-truth alpha file, read and checked against the photo's size before any inference:
    a missing, ambiguous, unreadable or mis-sized file is a MattingMetricsError (one line) then, not after
    the whole parity run. Empty without ``alphas_dir``. The values are read again when scored
    (:func:`with_ground_truth`), so a run over many photos does not hold every alpha meanwhile."""
    if alphas_dir is None:
        return {}
    from modnet_npu.proof.metrics import match_alphas

    photos = {c.path: c.rgb.shape[:2] for c in cases}
    found = {path: str(alpha) for path, alpha in match_alphas(sorted(photos), alphas_dir).items()}
    for path, alpha_path in found.items():
        _checked_alpha(alpha_path, path, photos[path])
    return found


def _checked_alpha(alpha_path: str, photo: str, size: tuple[int, int]) -> np.ndarray:
    """The alpha's values, a MattingMetricsError when it is not the photo's size."""
    from modnet_npu.proof.metrics import MattingMetricsError, load_alpha

    gt = load_alpha(alpha_path)
    if gt.shape != tuple(size):
        raise MattingMetricsError(f"{alpha_path}: ground truth is {gt.shape[0]}x{gt.shape[1]}, "
                                  f"but {os.path.basename(photo)} is {size[0]}x{size[1]}")
    return gt


def with_ground_truth(result: CaseResult, alpha_path: str) -> CaseResult:
    """``result`` with the matting metrics of both mattes (at the photo's size) against the ground truth."""
    from modnet_npu.proof.metrics import score

    size = result.case.rgb.shape[:2]
    gt = _checked_alpha(alpha_path, result.case.path, size)
    scores = {name: asdict(score(matte_to_size(m, size).astype(np.float64), gt))
              for name, m in (("ort", result.ort_matte), ("torch", result.torch_matte))}
    return CaseResult(**{**result.__dict__, "ground_truth": {"alpha": alpha_path, **scores}})


@dataclass(frozen=True)
class ParitySummary:
    results: tuple[CaseResult, ...]
    worst: CaseResult  # by max error

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def aggregate(self) -> dict:
        """The report's ``accuracy.aggregate``."""
        return {
            "images": len({r.case.path for r in self.results}),
            "cases": len(self.results),
            "cases_passing": sum(r.passed for r in self.results),
            "mean_mae": float(np.mean([r.floats.mae for r in self.results])),
            "worst_max_error": self.worst.floats.max_error,
            "worst_image": self.worst.case.path,
            "worst_size": list(self.worst.case.size),
            "failing": [f"{r.case.path} @ {r.case.size[0]}x{r.case.size[1]}" for r in self.results if not r.passed],
        }


def summarize(results: Sequence[CaseResult]) -> ParitySummary:
    # a failing case is worse than any passing one; among equals, the larger max error
    worst = max(results, key=lambda r: (not r.passed, r.floats.max_error))
    return ParitySummary(tuple(results), worst)
