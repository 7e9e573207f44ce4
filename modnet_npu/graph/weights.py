"""Read the weights and the basic facts of an ONNX file.

Weights live in ONNX files in several places: graph initializers, ``Constant``
nodes, external data files beside the model, and in float16 (or bfloat16) with
``Cast`` nodes that widen them at run time. This module reads all of them into
named float32 numpy arrays (integer tensors keep their type), records where each
came from, and answers "what constant value does this tensor name carry?",
following ``Cast``/``Identity``/``Transpose`` chains on constants.

It knows nothing of MODNet. CLI: a summary of the file, or the tensors as .npz.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from modnet_npu.errors import ModnetError
from modnet_npu.fileio import atomic_path
from modnet_npu.graph.index import GraphIndex, attr, node_name

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


class OnnxReadError(ModnetError, ValueError):
    """The file is missing, unreadable, or not an ONNX model."""


class MissingExternalDataError(OnnxReadError):
    """An external-data file the model names does not exist (beside the model)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a named constant came from and what it was stored as."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # as stored in the file, e.g. "float16"
    source: str  # "initializer" or "constant"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: name, element type and shape (ints, names of dynamic axes, or None)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)


@dataclass(frozen=True)
class GraphFacts:
    path: str
    opset: int
    producer: str
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    num_nodes: int
    op_counts: tuple[tuple[str, int], ...]


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "undefined"


def _value_info(vi: onnx.ValueInfoProto) -> ValueInfo:
    tt = vi.type.tensor_type
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return ValueInfo(vi.name, _dtype_name(tt.elem_type), tuple(dims))


def _read_proto(path: str) -> onnx.ModelProto:
    """The model proto alone, its external data not read yet."""
    if not os.path.exists(path):
        raise OnnxReadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise OnnxReadError(f"{path}: is a folder, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise OnnxReadError(f"{path}: file is empty")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxReadError(f"{path}: not a readable ONNX file (truncated or corrupt?): {reason}") from None


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX file with its external data; OnnxReadError on any failure.

    Model files are untrusted input: every external-data reference is checked
    (:func:`check_external_data`) before a byte of it is read.
    """
    path = os.fspath(path)
    model = _read_proto(path)
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise OnnxReadError(f"{path}: not a readable ONNX file (no graph nodes; truncated?)")
    base_dir = os.path.dirname(os.path.abspath(path))
    if check_external_data(model, base_dir, path):
        try:
            external_data_helper.load_external_data_for_model(model, base_dir)
        except FileNotFoundError as exc:  # removed between the check and the read
            raise MissingExternalDataError(f"{path}: external data file missing: {exc.filename or exc}") from None
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OnnxReadError(f"{path}: external data could not be read: {reason}") from None
    return model


# --------------------------------------------------------------------------
# external data: checked before it is read
# --------------------------------------------------------------------------

_EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})
# sub-byte types are packed: bits per element
_PACKED_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}


def _attribute_tensors(attr: onnx.AttributeProto) -> Iterator[onnx.TensorProto]:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    if attr.HasField("sparse_tensor"):
        yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
    if attr.HasField("g"):
        yield from _graph_tensors(attr.g)
    for sub in attr.graphs:
        yield from _graph_tensors(sub)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for a in node.attribute:
            yield from _attribute_tensors(a)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers, Constant (and other) node attributes,
    sub-graphs of If/Loop/Scan, and local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's shape and type need; None for a type with no fixed size."""
    numel = int(np.prod([int(d) for d in tensor.dims], dtype=object)) if tensor.dims else 1
    if tensor.data_type in _PACKED_BITS:
        return (numel * _PACKED_BITS[tensor.data_type] + 7) // 8
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    return None if dtype.kind == "O" else numel * dtype.itemsize


def _external_file(location: str, base_dir: str, what: str) -> str:
    """The real path of an external-data location, refused unless it is a file inside ``base_dir``."""
    if not location or "\0" in location:
        raise OnnxReadError(f"{what} has an empty or invalid external-data location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        raise OnnxReadError(f"{what}: external-data location {location!r} is absolute; only files beside the model "
                            "are read")
    if ".." in re.split(r"[\\/]", location):
        raise OnnxReadError(f"{what}: external-data location {location!r} contains '..'; only files beside the "
                            "model are read")
    root = os.path.realpath(base_dir)
    real = os.path.realpath(os.path.join(base_dir, location))
    if os.path.commonpath([root, real]) != root:
        raise OnnxReadError(f"{what}: external-data location {location!r} resolves to {real}, outside the model's "
                            f"folder {root} (a symlink?)")
    if not os.path.lexists(real):
        raise MissingExternalDataError(f"{what}: external data file missing: {location}")
    if not os.path.isfile(real):
        raise OnnxReadError(f"{what}: external-data location {location!r} is not a regular file")
    return real


def _whole(value: str, key: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise OnnxReadError(f"{what}: external-data {key} {value!r} is not a whole number of bytes")
    return number


def _check_external_tensor(tensor: onnx.TensorProto, base_dir: str, path: str) -> None:
    what = f"{path}: tensor {tensor.name or '<unnamed>'!r}"
    entries = {e.key: e.value for e in tensor.external_data}
    unknown = sorted(set(entries) - _EXTERNAL_KEYS)
    if unknown:
        raise OnnxReadError(f"{what}: unknown external-data key(s) {', '.join(map(repr, unknown))}")
    location = entries.get("location", "")
    real = _external_file(location, base_dir, what)
    size = os.path.getsize(real)
    offset = _whole(entries.get("offset", "0"), "offset", what)
    length = _whole(entries["length"], "length", what) if "length" in entries else max(size - offset, 0)
    if offset + length > size:
        raise OnnxReadError(f"{what}: declares bytes {offset}..{offset + length} of {location}, which holds only "
                            f"{size} bytes (truncated?)")
    needed = _tensor_nbytes(tensor)
    if needed is not None and needed != length:
        shape = "x".join(str(d) for d in tensor.dims) or "scalar"
        raise OnnxReadError(f"{what}: its shape {shape} of {_dtype_name(tensor.data_type)} needs {needed} bytes, "
                            f"but {length} are declared in {location}")


def check_external_data(model: onnx.ModelProto, base_dir: str, path: str = "<model>") -> int:
    """Check every external-data reference of ``model``; returns how many tensors use one.

    Refused, each with one OnnxReadError line: a location that is absolute,
    contains ``..``, or resolves (symlinks included) outside ``base_dir``; a
    byte range past the end of its file; a length that is not what the tensor's
    shape and type need; unknown keys. A file that does not exist raises
    :class:`MissingExternalDataError`. Nothing is read but the files' sizes.
    """
    count = 0
    for tensor in _model_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external_tensor(tensor, base_dir, path)
            count += 1
    return count


def _to_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        return np.ascontiguousarray(array.astype(np.float32))
    return array


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    raise OnnxReadError(f"Constant node {node_name(node)!r} has no supported value")


class OnnxWeights:
    """All named constants of one ONNX graph, as numpy arrays, plus graph facts."""

    def __init__(self, model: onnx.ModelProto, path: str = "<memory>") -> None:
        self.model = model
        self.path = path
        graph = model.graph
        self.arrays: dict[str, np.ndarray] = {}
        self.infos: dict[str, TensorInfo] = {}
        for init in graph.initializer:
            raw = numpy_helper.to_array(init)
            self._add(init.name, raw, _dtype_name(init.data_type), "initializer")
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                raw = _constant_node_value(node)
                self._add(node.output[0], raw, raw.dtype.name, "constant")
        self._index: GraphIndex | None = None
        self._derived: dict[str, np.ndarray | None] = {}
        self._derived_sources: dict[str, tuple[str, ...]] = {}
        self._facts: GraphFacts | None = None

    def _add(self, name: str, raw: np.ndarray, dtype: str, source: str) -> None:
        self.arrays[name] = _to_float32(np.asarray(raw))
        self.infos[name] = TensorInfo(name, tuple(int(d) for d in raw.shape), dtype, source)

    # ---- queries ---------------------------------------------------------

    @property
    def index(self) -> GraphIndex:
        """Producers and consumers of the graph's tensors (built once: the model is not changed after loading)."""
        if self._index is None:
            self._index = GraphIndex(self.model.graph)
        return self._index

    def resolve(self, name: str) -> np.ndarray | None:
        """The constant value carried by tensor ``name``, or None if it depends on data.

        Follows Cast, Identity and Transpose applied to constants: that is how
        float16 weights and some exporters' Linear weights reach their consumer.
        """
        if name in self.arrays:
            return self.arrays[name]
        if name not in self._derived:
            value, sources = None, ()
            node = self.index.producer(name)
            if node is not None and node.op_type in ("Cast", "Identity", "Transpose") and node.input:
                inner = self.resolve(node.input[0])
                if inner is not None:
                    sources = self.sources(node.input[0])
                    if node.op_type == "Transpose":
                        perm = attr(node, "perm")
                        value = np.ascontiguousarray(np.transpose(inner, perm))
                    elif node.op_type == "Cast" and inner.dtype.kind != "f":
                        to = int(attr(node, "to"))
                        value = _to_float32(inner.astype(onnx.helper.tensor_dtype_to_np_dtype(to)))
                    else:
                        # float -> float casts: the float32 copy already holds the
                        # value exactly (fp16 and bf16 widen losslessly)
                        value = inner
            self._derived[name] = value
            self._derived_sources[name] = sources
        return self._derived[name]

    def sources(self, name: str) -> tuple[str, ...]:
        """The stored constants behind a (possibly derived) constant tensor."""
        if name in self.arrays:
            return (name,)
        self.resolve(name)
        return self._derived_sources.get(name, ())

    def is_float(self, name: str) -> bool:
        return name in self.infos and self.arrays[name].dtype == np.float32

    def facts(self) -> GraphFacts:
        """The graph's contract and inventory (computed once: the model is not changed after loading)."""
        if self._facts is None:
            self._facts = self._read_facts()
        return self._facts

    def _read_facts(self) -> GraphFacts:
        graph = self.model.graph
        init_names = {i.name for i in graph.initializer}
        opset = max(
            (o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), default=0
        )
        counts = Counter(n.op_type for n in graph.node)
        producer = " ".join(p for p in (self.model.producer_name, self.model.producer_version) if p)
        return GraphFacts(
            path=self.path,
            opset=int(opset),
            producer=producer,
            # old exporters list initializers among the inputs too
            inputs=tuple(_value_info(v) for v in graph.input if v.name not in init_names),
            outputs=tuple(_value_info(v) for v in graph.output),
            num_nodes=len(graph.node),
            op_counts=tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        )

    def float_tensors(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.arrays.items() if v.dtype == np.float32}


def read_weights(path: str | os.PathLike[str]) -> OnnxWeights:
    """Load ``path`` and index its constants."""
    return OnnxWeights(load_onnx(path), os.fspath(path))


@dataclass(frozen=True)
class WeightSummary:
    path: str
    opset: int
    producer: str
    num_tensors: int
    num_initializers: int
    num_constant_nodes: int
    num_float_tensors: int
    num_float_values: int
    stored_dtypes: dict[str, int]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]


def summarize(weights: OnnxWeights) -> WeightSummary:
    facts = weights.facts()
    infos = weights.infos.values()
    floats = weights.float_tensors()
    return WeightSummary(
        path=weights.path,
        opset=facts.opset,
        producer=facts.producer,
        num_tensors=len(weights.infos),
        num_initializers=sum(i.source == "initializer" for i in infos),
        num_constant_nodes=sum(i.source == "constant" for i in infos),
        num_float_tensors=len(floats),
        num_float_values=int(sum(v.size for v in floats.values())),
        stored_dtypes=dict(sorted(Counter(i.dtype for i in infos).items())),
        inputs=facts.inputs,
        outputs=facts.outputs,
    )


def _format_io(v: ValueInfo) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in v.shape)
    return f"{v.name}: {v.dtype} [{dims}] ({'static' if v.is_static else 'dynamic'})"


def format_summary(s: WeightSummary) -> str:
    lines = [
        f"file:            {s.path}",
        f"opset:           {s.opset}" + (f"   producer: {s.producer}" if s.producer else ""),
        f"tensors:         {s.num_tensors} ({s.num_initializers} initializers, "
        f"{s.num_constant_nodes} Constant nodes)",
        f"float tensors:   {s.num_float_tensors} holding {s.num_float_values:,} values",
        "stored dtypes:   " + ", ".join(f"{k} x{v}" for k, v in s.stored_dtypes.items()),
    ]
    lines += [f"input            {_format_io(v)}" for v in s.inputs]
    lines += [f"output           {_format_io(v)}" for v in s.outputs]
    return "\n".join(lines)


def save_npz(weights: OnnxWeights, out_path: str) -> int:
    """Write every constant as float32 (or its integer type) to ``out_path`` atomically."""
    with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **weights.arrays)
    return len(weights.arrays)
