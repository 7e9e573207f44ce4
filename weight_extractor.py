"""Weights and graph facts of an ONNX file: ``python3 weight_extractor.py MODEL.onnx [--list] [--json] [--npz OUT]``.

The library lives in ``modnet_npu.graph.weights``; this file is its command line and
keeps the brief's import path (``from weight_extractor import read_weights``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Sequence

from modnet_npu.cli import Parser, lazy_exports, run_command
from modnet_npu.source.resolve import check_model_file

# ruff: noqa: F822  (the names of __all__ that the module does not bind come from __getattr__ below)
__all__ = ["GraphFacts", "OnnxReadError", "OnnxWeights", "TensorInfo", "ValueInfo", "load_onnx", "read_weights",
           "save_npz", "summarize", "main"]
# imported on first use (the reader loads onnx): --help and a bad option are answered without it
__getattr__, __dir__ = lazy_exports(__name__, {
    "modnet_npu.graph.weights": ("GraphFacts", "OnnxReadError", "OnnxWeights", "TensorInfo", "ValueInfo", "load_onnx",
                                 "read_weights", "save_npz", "summarize"),
})


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="Summarise the weights of an ONNX file, or dump them to .npz.")
    parser.add_argument("model", help="path to an .onnx file")
    parser.add_argument("--npz", metavar="PATH", default=None, help="also write every tensor to PATH (.npz)")
    parser.add_argument("--list", action="store_true", help="list every tensor with shape and stored dtype")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _run(args: argparse.Namespace) -> int:
    check_model_file(args.model)  # a missing file is one line before the reader imports onnx (most of a second)
    from modnet_npu.graph.weights import format_summary, read_weights, save_npz, summarize

    weights = read_weights(args.model)
    summary = summarize(weights)
    print(json.dumps(asdict(summary), indent=2) if args.json else format_summary(summary))
    if args.list:
        for info in weights.infos.values():
            print(f"  {info.name}  {list(info.shape)}  {info.dtype}  ({info.source})")
    if args.npz:
        n = save_npz(weights, args.npz)
        print(f"wrote {n} tensors to {args.npz}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
