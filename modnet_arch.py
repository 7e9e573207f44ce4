"""Architecture and graph analysis of a MODNet ONNX file:
``python3 modnet_arch.py MODEL.onnx [--size 512 | 320x480] [--batch N] [--json]``.

The analysis lives in ``modnet_npu.graph.analysis``; this file is its command line and keeps
the brief's import path (``from modnet_arch import analyse``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Sequence

from modnet_npu.cli import Parser, lazy_exports, run_command
from modnet_npu.matting.imaging import ShortSide, parse_size_spec
from modnet_npu.source.resolve import check_model_file

# ruff: noqa: F822  (the names of __all__ that the module does not bind come from __getattr__ below)
__all__ = ["ArchReport", "ConvRow", "analyse", "count_ops", "format_report", "main"]
# imported on first use (the analysis loads torch and onnx): --help and a bad option are answered without them
__getattr__, __dir__ = lazy_exports(__name__, {
    "modnet_npu.graph.analysis": ("ArchReport", "ConvRow", "analyse", "count_ops", "format_report"),
})


def _square_or_hw(text: str) -> tuple[int, int]:
    """``N`` (an N x N input) or ``HxW``, checked by the one size parser."""
    try:
        spec = parse_size_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if spec == "auto":
        raise argparse.ArgumentTypeError("give N or HxW: there is no image to apply 'auto' to")
    return (spec.pixels, spec.pixels) if isinstance(spec, ShortSide) else spec


def _batch(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="Analyse a MODNet ONNX graph: contract, ops, convolution table, parameters, cost.")
    parser.add_argument("model", help="path to a MODNet .onnx file")
    parser.add_argument("--size", type=_square_or_hw, default=(256, 256), help="input size for the cost, N or HxW")
    parser.add_argument("--batch", type=_batch, default=1, help="batch size for the cost")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def _run(args: argparse.Namespace) -> int:
    check_model_file(args.model)  # a missing file is one line before the analysis imports torch and onnx (seconds)
    from modnet_npu.graph.analysis import analyse, format_report

    report = analyse(args.model, *args.size, batch=args.batch)
    if args.json:
        data = asdict(report)
        data["gflops"] = report.gflops
        print(json.dumps(data, indent=2))
    else:
        print(format_report(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
