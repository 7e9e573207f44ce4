"""ONNX (or an official checkpoint) -> PyTorch state dict:
``python3 convert_onnx_to_torch.py MODEL.onnx [-o OUT.pt | OUT.safetensors] [--show-layers]``.

The converter lives in ``modnet_npu.conversion``; this file is its command line and keeps
the brief's import path (``from convert_onnx_to_torch import build_torch_model_from_onnx``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Sequence

from modnet_npu.cli import Parser, lazy_exports, run_command
from modnet_npu.errors import UsageError
from modnet_npu.source.resolve import check_model_file

if TYPE_CHECKING:
    from modnet_npu.conversion.convert import ConversionReport

# ruff: noqa: F822  (the names of __all__ that the module does not bind come from __getattr__ below)
__all__ = ["Conversion", "ConversionError", "ConversionReport", "build_torch_model_from_onnx", "convert",
           "save_state_dict", "main"]
# imported on first use (they load torch and onnx): --help and a bad option are answered without them
__getattr__, __dir__ = lazy_exports(__name__, {
    "modnet_npu.conversion.convert": ("Conversion", "ConversionError", "ConversionReport",
                                      "build_torch_model_from_onnx", "convert"),
    "modnet_npu.conversion.state_dict": ("save_state_dict",),
})


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="Convert a MODNet ONNX file (or an official .ckpt) to a PyTorch state dict.")
    parser.add_argument("source", help="MODNet .onnx file, or an official .ckpt/.pth checkpoint")
    parser.add_argument("-o", "--output", default=None,
                        help="output .pt or .safetensors (default: the source's name with .pt)")
    parser.add_argument("--show-layers", action="store_true", help="print which ONNX node filled each layer")
    return parser


def _print_conversion(r: ConversionReport, show_layers: bool) -> None:
    print(f"converted {r.source}: opset {r.opset}, input {r.input_name} {list(r.input_shape)}")
    print(f"  {r.num_units} layers placed, {r.num_folded_batchnorms} BatchNorms folded by the exporter, "
          f"{r.num_source_tensors_used} source tensors used, {r.num_parameters:,} parameters")
    if r.leftovers:
        print(f"  warning: {len(r.leftovers)} float tensor(s) in the file were not used:")
        for name, shape in r.leftovers:
            print(f"    {name} {list(shape)}")
    if show_layers:
        for layer in r.layers:
            print(f"  {layer.module:<45} <- {', '.join(layer.onnx_nodes)}")


def _run(args: argparse.Namespace) -> int:
    out = args.output or os.path.splitext(args.source)[0] + ".pt"
    if not out.endswith((".pt", ".pth", ".safetensors")):
        raise UsageError(f"output {out!r} must end in .pt, .pth or .safetensors")
    check_model_file(args.source)  # a missing file is one line before the converter imports torch and onnx
    from modnet_npu.conversion.convert import convert
    from modnet_npu.conversion.state_dict import CHECKPOINT_SUFFIXES, save_state_dict
    from modnet_npu.model.modnet import load_checkpoint

    if args.source.endswith(CHECKPOINT_SUFFIXES):
        model = load_checkpoint(args.source)
        print(f"loaded checkpoint {args.source} (strict)")
    else:
        result = convert(args.source)
        model = result.model
        _print_conversion(result.report, args.show_layers)
    save_state_dict(model, out)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
