"""MODNet ONNX files with seeded weights, in the flavours real copies come in:
``python3 synthetic_model.py [--out-dir DIR] [--flavour F] [--seed N]``.

The generator lives in ``modnet_npu.source.synthetic``; this file is its command line.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from modnet_npu.cli import Parser, lazy_exports, run_command
from modnet_npu.source.flavours import DEFAULT_SEED, FLAVOURS, check_generate

# ruff: noqa: F822  (the names of __all__ that the module does not bind come from __getattr__ below)
__all__ = ["FLAVOURS", "generate", "seeded_modnet", "main"]
# imported on first use (the generator loads torch and onnx): --help and a bad option are answered without them
__getattr__, __dir__ = lazy_exports(__name__, {"modnet_npu.source.synthetic": ("generate", "seeded_modnet")})


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="Export MODNet ONNX files with seeded weights, in the flavours real copies come in.")
    parser.add_argument("--out-dir", default="models/synthetic", help="folder for modnet_<flavour>.onnx")
    parser.add_argument("--flavour", action="append", choices=FLAVOURS,
                        help="flavour to write (repeatable); all when omitted")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="weight seed")
    return parser


def _run(args: argparse.Namespace) -> int:
    flavours = args.flavour or FLAVOURS
    check_generate(args.out_dir, flavours)  # refused in a fraction of a second, before the generator loads torch
    from modnet_npu.source.synthetic import generate

    paths = generate(args.out_dir, flavours, args.seed)
    for flavour, path in paths.items():
        print(f"{flavour:<12} {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
