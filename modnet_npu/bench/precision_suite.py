"""Every quality claim, measured on the real MODNet weights: the ``precision`` suite.

Four sections, each a function returning frozen rows, and :func:`run_suite`
that runs the ones asked for and writes ``precision_suite.json`` and
``precision_suite.md`` (the tables of docs/REAL_MODEL.md):

* ``precision`` (:func:`measure_precision`): half precision against ONNX Runtime
  fp32 on the portrait: the decoder only (the optimized form, backbone and SE
  block kept in fp32, what ``--precision`` runs) and the whole model (the
  faithful form cast whole), fp16 and bf16, at 256x256, 512x512 and at the
  official rule's size of a 1000x750 photo (the portrait resized: 512x672).
* ``demos`` (:func:`compare_demos`): the project's end-to-end 8-bit matte
  against MODNet's two official demos (:mod:`official_demo`), and the demos
  against each other, for the portrait resized to photos from 2000x1500 down to
  200x150 (shrunk and grown to the model's input).
* ``layers`` (:func:`check_layers`): the layer-by-layer comparison without a
  fault (worst relative and local errors against each precision's threshold)
  and with one weight tensor scaled by 1.01 (where the first divergence lands).
* ``golden`` (:func:`measure_golden`): every engine, form, precision and batch
  size against the golden mattes (the figures the test suite's bounds are
  twice of: tests/test_real_model.py, HALF_MEASURED).

Plus :func:`write_golden` (the test suite's golden mattes) and
:func:`golden_agreement` (how a matte agrees with one).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from modnet_npu import DEFAULT_IMAGE
from modnet_npu.fileio import write_bytes, write_image, write_json
from modnet_npu.matting.imaging import Size, load_image, matte_to_size, model_input, official_size, to_uint8

if TYPE_CHECKING:  # torch is imported where it is used: the tables and the parser stay torch-free
    from modnet_npu.conversion.convert import Conversion

Log = Callable[[str], None]
SECTIONS = ("precision", "demos", "layers", "golden")
# the official rule's case: a photo of this size (width x height), the portrait resized with Lanczos
RULE_PHOTO = (1000, 750)
DEMO_PHOTOS = ((2000, 1500), (1000, 750), (750, 1000), (640, 480), (512, 512), (400, 300), (300, 400), (200, 150))
GOLDEN_SIZES: tuple[Size, ...] = ((256, 256), (512, 512))
PARTS = {"decoder": "optimized", "whole": "faithful"}  # what runs in half precision -> the model form
FAULT_LAYERS = ("hr_branch.conv_hr4x.0.layers.0", "backbone.model.features.5.conv.3")


def photo(image: str, size: tuple[int, int] | None) -> np.ndarray:
    """The image as uint8 RGB, resized (Lanczos) to ``size`` = (width, height) when given."""
    from PIL import Image

    rgb = load_image(image)
    if size is None or (rgb.shape[1], rgb.shape[0]) == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(tuple(size), Image.Resampling.LANCZOS))


def precision_cases(image: str = DEFAULT_IMAGE) -> list[tuple[str, np.ndarray]]:
    """(label, model input [1, 3, h, w]) for 256x256, 512x512 and the official rule's size."""
    rgb = photo(image, None)
    rule = photo(image, RULE_PHOTO)
    rule_size = official_size(*rule.shape[:2])
    return [("256x256", model_input(rgb, (256, 256))[None]), ("512x512", model_input(rgb, (512, 512))[None]),
            (f"rule {rule_size[0]}x{rule_size[1]} ({RULE_PHOTO[0]}x{RULE_PHOTO[1]} photo)",
             model_input(rule, rule_size)[None])]


def _conversion(model_path: str, conversion: Conversion | None) -> Conversion:
    """The one conversion of the file: the one given, else made now (a caller running several cases converts
    once and passes it: each conversion reads, analyses and matches the whole file again)."""
    if conversion is not None:
        return conversion
    from modnet_npu.conversion.convert import convert

    return convert(model_path)


def _fresh_model(conversion: Conversion, form: str):
    """A model of its own in ``form``, from the conversion's: cast, moved or faulted at will. The conversion's
    model itself is never changed (the layer-by-layer comparison takes it as its float64 reference)."""
    from modnet_npu.model.optimized import optimize

    return optimize(conversion.model) if form == "optimized" else copy.deepcopy(conversion.model)


def _torch_engine(model_path: str, form: str, precision: str, device: str, threads: int, *,
                  conversion: Conversion | None = None):
    from modnet_npu.runtime import devices
    from modnet_npu.runtime.torch_engine import TorchEngine

    model = _fresh_model(_conversion(model_path, conversion), form)
    return TorchEngine(model, devices.select_device(device), precision=precision, strict_fp32=True, threads=threads)


# --------------------------------------------------------------------------
# half precision against ONNX Runtime fp32
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionRow:
    part: str  # "decoder" (optimized form) or "whole" (faithful form)
    precision: str
    case: str
    mae: float
    max_error: float
    pct_over_one_level: float  # % of pixels whose |error| > 1/255
    seconds: float  # one forward, wall time (a busy machine's)


def errors(matte: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """MAE, max and % of pixels over one 8-bit level between two float mattes."""
    d = np.abs(np.asarray(matte, np.float64) - np.asarray(reference, np.float64))
    return float(d.mean()), float(d.max()), float(100.0 * (d > 1.0 / 255.0).mean())


def measure_precision(model_path: str, *, image: str = DEFAULT_IMAGE, precisions: Sequence[str] = ("fp16", "bf16"),
                      parts: Sequence[str] = tuple(PARTS), device: str = "cpu", threads: int = 0,
                      conversion: Conversion | None = None, log: Log = print) -> tuple[PrecisionRow, ...]:
    """Each part in each precision on each case, against ONNX Runtime fp32 on the CPU; the file converted
    once (``conversion``, if made already)."""
    from modnet_npu.runtime.engines import OrtEngine

    conversion = _conversion(model_path, conversion)
    cases = precision_cases(image)
    ort = OrtEngine(model_path, threads=threads)
    refs = {label: ort.infer(x) for label, x in cases}
    rows = []
    for part in parts:
        for precision in precisions:
            engine = _torch_engine(model_path, PARTS[part], precision, device, threads, conversion=conversion)
            try:
                for label, x in cases:
                    start = time.perf_counter()
                    out = engine.infer(x)
                    row = PrecisionRow(part, precision, label, *errors(out, refs[label]), time.perf_counter() - start)
                    log(f"{part} {precision} {label}: MAE {row.mae:.2g}, max {row.max_error:.2g}, "
                        f"{row.pct_over_one_level:.2f}% over one level ({row.seconds:.1f} s)")
                    rows.append(row)
            finally:
                engine.close()
    return tuple(rows)


def precision_table(rows: Sequence[PrecisionRow]) -> str:
    lines = ["| half precision in | precision | input | MAE | max | pixels over one level |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        part = "decoder only (backbone fp32)" if r.part == "decoder" else "whole model"
        lines.append(f"| {part} | {r.precision} | {r.case} | {r.mae:.2g} | {r.max_error:.2g} | "
                     f"{r.pct_over_one_level:.2f}% |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the official demos
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoRow:
    photo: tuple[int, int]  # width, height
    model_size: Size
    pair: str  # "project vs ONNX demo", "project vs PyTorch demo", "ONNX demo vs PyTorch demo"
    iou: float
    mae: float
    max_error: float
    pct_over_one_level: float
    pct_over_two_levels: float


def project_matte(rgb: np.ndarray, infer: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The project's 8-bit matte as ``inference.py --mode matte`` writes it (size auto, the same steps)."""
    size = official_size(*rgb.shape[:2])
    return to_uint8(matte_to_size(infer(model_input(rgb, size)[None]), rgb.shape[:2]))


def compare_demos(model_path: str, *, image: str = DEFAULT_IMAGE, photos: Sequence[tuple[int, int]] = DEMO_PHOTOS,
                  threads: int = 0, log: Log = print) -> tuple[DemoRow, ...]:
    """The project, the ONNX demo and the PyTorch demo, all three on ONNX Runtime, pair by pair."""
    from modnet_npu.bench.official_demo import agreement, onnx_demo_matte, pytorch_demo_matte
    from modnet_npu.runtime.engines import OrtEngine

    ort = OrtEngine(model_path, threads=threads)
    rows = []
    for wh in photos:
        rgb = photo(image, wh)
        ours, onnx_demo = project_matte(rgb, ort.run), onnx_demo_matte(rgb, ort.run)
        torch_demo = pytorch_demo_matte(rgb, ort.run)
        pairs = {"project vs ONNX demo": (ours, onnx_demo), "project vs PyTorch demo": (ours, torch_demo),
                 "ONNX demo vs PyTorch demo": (onnx_demo, torch_demo)}
        for pair, (a, b) in pairs.items():
            g = agreement(a, b)
            rows.append(DemoRow(tuple(wh), official_size(*rgb.shape[:2]), pair, g.iou, g.mae, g.max_error,
                                g.pct_over_one_level, g.pct_over_two_levels))
        log(f"{wh[0]}x{wh[1]}: " + "; ".join(f"{r.pair}: IoU {r.iou:.4f}, MAE {r.mae:.4f}, "
                                              f">1 level {r.pct_over_one_level:.2f}%" for r in rows[-3:]))
    return tuple(rows)


def demo_table(rows: Sequence[DemoRow]) -> str:
    lines = ["| photo (w x h) | model input | pair | IoU at 0.5 | MAE | pixels > 1 level | > 2 levels | max |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.photo[0]}x{r.photo[1]} | {r.model_size[0]}x{r.model_size[1]} | {r.pair} | {r.iou:.4f} | "
                     f"{r.mae:.4f} | {r.pct_over_one_level:.2f}% | {r.pct_over_two_levels:.2f}% | "
                     f"{r.max_error:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# layer by layer
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCheckRow:
    form: str
    precision: str
    fault: str | None  # the layer whose weight was scaled by 1.01, or None
    threshold: float
    first_divergence: str | None
    worst_local: str | None
    max_rel: float  # the largest relative (inherited) error of any row
    max_local_rel: float  # the largest relative local error of any row
    matte_rel: float
    layers_compared: int


def _layer_model(model_path: str, form: str, fault: str | None, *, conversion: Conversion | None = None):
    import torch

    from modnet_npu.proof.layerwise import optimized_module_name

    conversion = _conversion(model_path, conversion)
    model = _fresh_model(conversion, form)
    if fault is not None:
        name = optimized_module_name(conversion.model, fault) + ".conv" if form == "optimized" else fault
        with torch.no_grad():
            model.get_submodule(name).weight.mul_(1.01)
    return model


def check_layers(model_path: str, *, image: str = DEFAULT_IMAGE, size: Size = (256, 256),
                 runs: Sequence[tuple[str, str, str | None]] = (
                     ("optimized", "fp32", None), ("faithful", "fp32", None), ("optimized", "fp16", None),
                     ("optimized", "bf16", None), ("faithful", "fp16", None), ("faithful", "bf16", None),
                     *(("optimized", "fp32", f) for f in FAULT_LAYERS)),
                 conversion: Conversion | None = None, log: Log = print) -> tuple[LayerCheckRow, ...]:
    """:func:`layerwise.compare_layers` for each (form, precision, faulty layer or None); the file converted
    once (``conversion``, if made already) for the models and the comparisons."""
    from modnet_npu.model.optimized import with_precision
    from modnet_npu.proof.layerwise import compare_layers

    conversion = _conversion(model_path, conversion)
    x = model_input(photo(image, None), size)[None]
    rows = []
    for form, precision, fault in runs:
        model, _ = with_precision(_layer_model(model_path, form, fault, conversion=conversion), precision)
        rep = compare_layers(model_path, model, x, precision=precision, conversion=conversion)
        row = LayerCheckRow(form, precision, fault, rep.threshold, rep.first_divergence, rep.worst_local,
                            max(r.rel for r in rep.rows), max(r.local_rel for r in rep.rows), rep.rows[-1].rel,
                            rep.layers_compared)
        log(f"{form} {precision} fault={fault}: first divergence {row.first_divergence}, worst local "
            f"{row.worst_local}, max rel {row.max_rel:.2g}, max local {row.max_local_rel:.2g}")
        rows.append(row)
    return tuple(rows)


def fault_example(model_path: str, output_dir: str | None = None, *, image: str = DEFAULT_IMAGE,
                  size: Size = (256, 256), layer: str = FAULT_LAYERS[0], conversion: Conversion | None = None):
    """The README's example on real weights: the faithful model with ``layer``'s weight x1.01.

    Returns the report; with ``output_dir``, writes ``layerwise_fault.png`` and ``layerwise_fault.json``.
    """
    from modnet_npu.proof.layerwise import compare_layers, layerwise_figure

    conversion = _conversion(model_path, conversion)
    rep = compare_layers(model_path, _layer_model(model_path, "faithful", layer, conversion=conversion),
                         model_input(photo(image, None), size)[None], conversion=conversion)
    if output_dir is not None:
        layerwise_figure(rep, os.path.join(output_dir, "layerwise_fault.png"))
        write_json(os.path.join(output_dir, "layerwise_fault.json"), rep.to_dict())
    return rep


def layer_table(rows: Sequence[LayerCheckRow]) -> str:
    lines = ["| form | precision | fault (weight x1.01) | threshold | first divergence | worst local | max rel | "
             "max local rel | matte rel | rows |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.form} | {r.precision} | {r.fault or 'none'} | {r.threshold:g} | "
                     f"{r.first_divergence or 'none'} | {r.worst_local} | {r.max_rel:.2g} | {r.max_local_rel:.2g} | "
                     f"{r.matte_rel:.2g} | {r.layers_compared} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# golden mattes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GoldenAgreement:
    """A float matte against a golden 8-bit one: ``d = |255 * matte - golden|`` in levels."""

    max_d: float  # the float matte's largest distance from the golden level
    mae: float  # mean |round(255 * matte) - golden| / 255
    pct_over_one_level: float  # % of pixels whose rounded level is more than one from the golden
    max_level_error: int  # largest |round(255 * matte) - golden|


def golden_agreement(matte: np.ndarray, golden: np.ndarray) -> GoldenAgreement:
    m = np.asarray(matte, np.float64).reshape(golden.shape)
    d = np.abs(255.0 * m - golden.astype(np.float64))
    levels = np.abs(to_uint8(m).astype(np.int16) - golden.astype(np.int16))
    return GoldenAgreement(float(d.max()), float(levels.mean() / 255.0), float(100.0 * (levels > 1).mean()),
                           int(levels.max()))


def golden_name(size: Size) -> str:
    return f"portrait_{size[0]}x{size[1]}_ort.png"


def write_golden(model_path: str, out_dir: str, *, image: str = DEFAULT_IMAGE,
                 sizes: Sequence[Size] = GOLDEN_SIZES) -> list[str]:
    """The portrait at each size through ONNX Runtime fp32, written as 8-bit PNG mattes; their paths."""
    from PIL import Image

    from modnet_npu.runtime.engines import OrtEngine

    ort, rgb, paths = OrtEngine(model_path, threads=0), photo(image, None), []
    for size in sizes:
        path = os.path.join(out_dir, golden_name(size))
        write_image(path, Image.fromarray(to_uint8(ort.infer(model_input(rgb, size)[None])[0])), optimize=True)
        paths.append(path)
    return paths


GOLDEN_KINDS = (("ort", "fp32"), ("optimized", "fp32"), ("optimized", "fp16"), ("optimized", "bf16"),
                ("faithful", "fp32"), ("faithful", "fp16"), ("faithful", "bf16"))


@dataclass(frozen=True)
class GoldenRow:
    kind: str  # "ort", or the PyTorch model form
    precision: str
    side: int
    batch: int  # 2: the mirrored portrait first, the portrait second (whose matte is scored)
    agreement: GoldenAgreement
    seconds: float


def measure_golden(model_path: str, *, image: str = DEFAULT_IMAGE, sizes: Sequence[Size] = GOLDEN_SIZES,
                   batches: Sequence[int] = (1, 2), threads: int = 1, conversion: Conversion | None = None,
                   log: Log = print) -> tuple[GoldenRow, ...]:
    """Each engine (ONNX Runtime; PyTorch in each form and precision) at each size and batch against the
    golden matte :func:`write_golden` makes, on the CPU with ``threads`` threads."""
    import torch

    from modnet_npu.runtime.engines import OrtEngine

    ort, rgb = OrtEngine(model_path, threads=threads), photo(image, None)
    inputs = {size: model_input(rgb, size)[None] for size in sizes}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the engines' own setting leaves torch's pool as it is: set it here
    try:  # the file converted once for the six PyTorch engines
        return _golden_rows(model_path, ort, inputs, batches, threads, _conversion(model_path, conversion), log)
    finally:
        torch.set_num_threads(before)


def _golden_rows(model_path: str, ort, inputs: dict, batches: Sequence[int], threads: int,
                 conversion: Conversion, log: Log) -> tuple[GoldenRow, ...]:
    golden = {size: to_uint8(ort.infer(x)[0]) for size, x in inputs.items()}
    rows = []
    for kind, precision in GOLDEN_KINDS:
        engine = ort if kind == "ort" else _torch_engine(model_path, kind, precision, "cpu", threads,
                                                         conversion=conversion)
        for size, x in inputs.items():
            for batch in batches:
                feed = x if batch == 1 else np.concatenate([x[..., ::-1]] * (batch - 1) + [x]).copy()
                start = time.perf_counter()
                matte = engine.infer(feed)[-1]
                row = GoldenRow(kind, precision, size[0], batch, golden_agreement(matte, golden[size]),
                                time.perf_counter() - start)
                log(f"{kind} {precision} {size[0]}x{size[1]} batch {batch}: mean {row.agreement.mae:.3g}, "
                    f"{row.agreement.pct_over_one_level:.3g}% over one level, max {row.agreement.max_level_error}")
                rows.append(row)
        if engine is not ort:
            engine.close()
    return tuple(rows)


def golden_table(rows: Sequence[GoldenRow]) -> str:
    lines = ["| engine / form | precision | size | batch | mean level error | % > 1 level | max level error | "
             "max distance from the level | s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        a = r.agreement
        lines.append(f"| {'ONNX Runtime' if r.kind == 'ort' else r.kind} | {r.precision} | {r.side}² | {r.batch} | "
                     f"{a.mae:.3g} | {a.pct_over_one_level:.3g}% | {a.max_level_error} | {a.max_d:.4f} | "
                     f"{r.seconds:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteResult:
    model: str
    sha256: str
    precision: tuple[PrecisionRow, ...]
    demos: tuple[DemoRow, ...]
    layers: tuple[LayerCheckRow, ...]
    golden: tuple[GoldenRow, ...]
    fault_table: str  # the ten worst rows of :func:`fault_example` ("" when the layers section did not run)
    seconds: float

    def markdown(self) -> str:
        parts = [f"Model: `{self.model}` (sha256 `{self.sha256}`)"]
        for title, rows, table in (("Half precision against ONNX Runtime fp32", self.precision, precision_table),
                                   ("The official demos", self.demos, demo_table),
                                   ("Layer by layer", self.layers, layer_table),
                                   ("Against the golden mattes", self.golden, golden_table)):
            if rows:
                parts.append(f"## {title}\n\n{table(rows)}")
        if self.fault_table:
            parts.append(f"## A wrong weight (x1.01), faithful form, 256x256: the ten worst rows\n\n{self.fault_table}")
        return "\n\n".join(parts) + "\n"


def run_suite(model: str | None = None, *, output_dir: str | None = None, sections: Sequence[str] = SECTIONS,
              image: str = DEFAULT_IMAGE, device: str = "cpu", threads: int = 0, models_dir: str | None = None,
              log: Log = print) -> SuiteResult:
    """Resolve the model (the real file by default: never the generated one), run ``sections``, write them.

    ``output_dir``: where ``precision_suite.json``, ``precision_suite.md`` and (layers)
    ``layerwise_fault.png``/``.json`` go (None: not written). ModelSourceError when the
    model cannot be had, ValueError for an unknown section.
    """
    from modnet_npu.source.resolve import DEFAULT_MODEL_ID, DEFAULT_MODELS_DIR, resolve_model

    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    start = time.perf_counter()
    src = resolve_model(model or DEFAULT_MODEL_ID, models_dir or DEFAULT_MODELS_DIR, log=log)
    # converted once for every PyTorch model of the suite (the demos section runs ONNX Runtime only)
    conv = _conversion(src.path, None) if {"precision", "layers", "golden"} & set(sections) else None
    result = SuiteResult(
        src.path, src.sha256,
        measure_precision(src.path, image=image, device=device, threads=threads, conversion=conv, log=log)
        if "precision" in sections else (),
        compare_demos(src.path, image=image, threads=threads, log=log) if "demos" in sections else (),
        check_layers(src.path, image=image, conversion=conv, log=log) if "layers" in sections else (),
        measure_golden(src.path, image=image, threads=threads or 1, conversion=conv, log=log)
        if "golden" in sections else (),
        fault_example(src.path, output_dir, image=image, conversion=conv).worst_table(10)
        if "layers" in sections else "",
        time.perf_counter() - start,
    )
    if output_dir is not None:
        write_json(os.path.join(output_dir, "precision_suite.json"), {"suite": "precision", **asdict(result)})
        write_bytes(os.path.join(output_dir, "precision_suite.md"), result.markdown().encode("utf-8"))
    return result


def build_parser(prog: str = "python3 benchmark.py precision"):
    """``benchmark.py precision``: the real-weight quality figures of docs/REAL_MODEL.md."""
    from modnet_npu.cli import Parser

    p = Parser(prog=prog, description="Half precision, the official demos, layer by layer and the golden mattes, "
                                      "on the real model.")
    p.add_argument("--model", default=None, help="ONNX file or model id (default: the real model, never the generated one)")
    p.add_argument("--models-dir", default=None, help="download cache (default: models/)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="the photo")
    p.add_argument("--sections", default=",".join(SECTIONS), help="which sections: " + ", ".join(SECTIONS))
    p.add_argument("--device", default="cpu", help="the PyTorch side's device for the precision section")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = automatic)")
    p.add_argument("--output-dir", default="output/precision", help="where precision_suite.json/.md go")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the sections, print the tables (markdown), write them."""
    from modnet_npu.cli import run_command

    def body(args) -> int:
        from modnet_npu.errors import UsageError

        sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown or not sections:
            raise UsageError(f"--sections: choose from {', '.join(SECTIONS)}, comma-separated")
        result = run_suite(args.model, output_dir=args.output_dir, sections=sections, image=args.image,
                           device=args.device, threads=args.threads, models_dir=args.models_dir)
        print(result.markdown())
        return 0

    return run_command(build_parser(), body, argv)
