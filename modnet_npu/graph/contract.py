"""Is this ONNX file a matting model MODNet's engines can run? Checked without torch.

The ONNX Runtime and OpenVINO engines run the file itself; what they need is
MODNet's contract: one image input ``(N, 3, h, w)`` of floats and one matte
output ``(N, 1, h, w)``, computed by convolutions. This check reads the file
with the project's safe reader (external data checked before it is read,
:func:`modnet_npu.graph.weights.load_onnx`) and looks at the declared inputs,
outputs and operators — no PyTorch model is built, so the runtime paths start
without importing torch. The PyTorch path converts the file, which checks far
more (every layer matched to MODNet's).

Failures raise :class:`NotAMattingModel` (one line, naming what differs), or
``OnnxReadError`` for a file that is not readable ONNX at all.

A file whose sha256 is one this check has passed (:data:`KNOWN_CONTRACTS`: the
default model) gets that verdict from its digest: hashing it costs a few
hundredths of a second, importing onnx alone most of a second of CPU (ml_dtypes
registering its types with numpy), so the default model's ONNX Runtime and
OpenVINO paths start without onnx. Any other file is read and checked in full.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modnet_npu.errors import ModnetError

if TYPE_CHECKING:
    import onnx

# The files this check has passed, by sha256, with the contract it found there (input name, input shape, output
# shape): the same bytes get the same verdict without being parsed. tests/test_startup.py runs the full check on
# the real file and compares, so a stricter check cannot leave a stale entry here.
KNOWN_CONTRACTS: dict[str, tuple[str, tuple[int | None, ...], tuple[int | None, ...]]] = {
    # onnx-community/modnet-webnn onnx/model.onnx, the default model (source.resolve.KNOWN_SHA256)
    "07c308cf0fc7e6e8b2065a12ed7fc07e1de8febb7dc7839d7b7f15dd66584df9": ("input", (None, 3, None, None),
                                                                          (None, 1, None, None)),
}


class NotAMattingModel(ModnetError, ValueError):
    """A readable ONNX file whose inputs, outputs or operators are not MODNet's contract."""


@dataclass(frozen=True)
class Contract:
    """The file's image input and matte output as declared (ints, or None where dynamic)."""

    path: str
    input_name: str
    input_shape: tuple[int | None, ...]
    output_shape: tuple[int | None, ...]

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        h, w = self.input_shape[2], self.input_shape[3]
        return (h, w) if h is not None and w is not None else None


def _dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None  # rank not declared
    return tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tensor.shape.dim)


def check_matting_file(path: str | os.PathLike[str]) -> Contract:
    """The file's contract, once it is one MODNet's engines can run; NotAMattingModel naming what differs."""
    from modnet_npu.graph.weights import load_onnx

    path = os.fspath(path)
    return _contract_of(load_onnx(path), path)


def _contract_of(model: onnx.ModelProto, path: str) -> Contract:
    import onnx

    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE}
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]  # old exporters list weights as inputs too
    where = f"{path}: not a MODNet graph"
    if len(inputs) != 1:
        raise NotAMattingModel(f"{where}: expected one image input, found {len(inputs)}")
    if len(graph.output) != 1:
        raise NotAMattingModel(f"{where}: expected one output, found {len(graph.output)}")
    inp, out = inputs[0], graph.output[0]
    for what, value, channels in (("input", inp, 3), ("output", out, 1)):
        dims = _dims(value)
        if value.type.tensor_type.elem_type not in float_types:
            raise NotAMattingModel(f"{where}: the {what} {value.name!r} is not a float tensor")
        if dims is not None and (len(dims) != 4 or dims[1] not in (channels, None)):
            raise NotAMattingModel(f"{where}: the {what} {value.name!r} has shape {list(dims)}, "
                                   f"expected (N, {channels}, h, w)")
    if not any(node.op_type == "Conv" for node in graph.node):
        raise NotAMattingModel(f"{where}: no convolutions")
    in_dims = _dims(inp) or (None, 3, None, None)
    out_dims = _dims(out) or (None, 1, None, None)
    return Contract(path, inp.name, in_dims, out_dims)


# MODNet's weight-carrying layers as the converter finds them in any export: 69 convolutions
# (backbone 52, low-res 1 + SE-free heads, high-res and fusion branches) and the SE block's 2 linears.
MODNET_CONVOLUTIONS = 69
MODNET_LINEARS = 2


def check_model(path: str | os.PathLike[str]) -> Contract:
    """The one model check of every path (local, Ray, service; every backend), without torch.

    A file known by its sha256 (:data:`KNOWN_CONTRACTS`) gets its known contract.
    Any other: the contract above, then the converter's ONNX side
    (``conversion.onnx_units``: units found by following edges, whatever the
    exporter) must find MODNet's layers: a foreign network with the right input
    and output is refused here, not run as if it were MODNet. The PyTorch backend
    then converts the file, which also matches every layer's shape.
    """
    from modnet_npu.source.resolve import sha256_of

    path = os.fspath(path)
    try:
        known = KNOWN_CONTRACTS.get(sha256_of(path)) if os.path.isfile(path) else None
    except OSError:  # unreadable: the full check says why, in one line
        known = None
    if known is not None:
        return Contract(path, *known)
    return check_parsed(path)


def check_parsed(path: str) -> Contract:
    """:func:`check_model` reading and checking the file in full, whatever its digest."""
    from modnet_npu.conversion.labels import ConvLabel, LinearLabel
    from modnet_npu.conversion.onnx_units import analyse_onnx
    from modnet_npu.graph.weights import OnnxWeights, load_onnx

    model = load_onnx(path)  # read once: the contract and the units both look at it
    contract = _contract_of(model, path)
    units = analyse_onnx(OnnxWeights(model, path)).units
    convs = sum(isinstance(u.label, ConvLabel) for u in units)
    linears = sum(isinstance(u.label, LinearLabel) for u in units)
    if (convs, linears) != (MODNET_CONVOLUTIONS, MODNET_LINEARS):
        raise NotAMattingModel(f"{path}: not a MODNet graph: {convs} convolutions and {linears} linear "
                               f"layers, MODNet has {MODNET_CONVOLUTIONS} and {MODNET_LINEARS}")
    return contract
