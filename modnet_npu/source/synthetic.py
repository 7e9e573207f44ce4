"""MODNet ONNX files made from this project's own model with seeded weights.

Tests use files exported here for the structure of every kind of copy, and the
main command uses one as its loudly announced last resort when the real
``onnx-community/modnet-webnn`` file can be had from no source at all. Their
weights are seeded and their BatchNorm statistics deliberately non-trivial (a
converter that ignored running mean or variance would fail parity). They come
in the flavours real copies come in (README, *The converter*):

=============  ==============================================================
flavour        what it imitates
=============  ==============================================================
official       the official export, which is what ``modnet-webnn``'s
               ``onnx/model.onnx`` is: opset 11, dynamic
               [batch_size,3,height,width], ``input``/``output``, the SE
               block's Shape/Gather/Reshape/Expand chain, Resize scales as
               initializers, Clip bounds, Slice indices and InstanceNorm
               scale/bias as ``Constant`` nodes: 215 initializers and 241
               ``Constant`` nodes, as in the real file. The fallback's flavour.
webnn          a static re-export: [1,3,256,256], opset 13, names kept,
               InstanceNormalization nodes, backbone BatchNorm folded (the
               layout this project once assumed the real file had)
opset17        TorchScript exporter at opset 17, InstanceNorm as mean/var ops
dynamo         the dynamo exporter (opset 18): Gemm, decomposed variance
simplified     the official export after onnxslim (constants folded)
fp16           weights stored as float16 with Cast nodes (model_fp16.onnx)
anonymous      anonymised tensor names, shuffled node order, half of the
               weights as Constant nodes, Linear as Gemm(transB=1)
ort            re-saved by ONNX Runtime's basic graph optimisations
ort_extended   re-saved at ONNX Runtime's extended level (FusedConv with
               Relu/Clip/Sigmoid in the com.microsoft domain)
=============  ==============================================================
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import tempfile
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from modnet_npu.fileio import atomic_path
from modnet_npu.model.modnet import MODNet, IBNorm, INSTANCE_NORM_EPS, SEBlock
# the names and the seed live torch-free: synthetic_model.py's parser offers them before torch loads
from modnet_npu.source.flavours import DEFAULT_SEED, FLAVOURS  # noqa: F401  (re-exported)
from modnet_npu.source.flavours import (FLAVOUR_PACKAGES, MissingPackageError,  # noqa: F401  (re-exported)
                                        check_flavours, check_generate)

STATIC_SIZE = 256


def seeded_modnet(seed: int = DEFAULT_SEED) -> MODNet:
    """MODNet with reproducible random weights and non-trivial BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape: Sequence[int], lo: float, hi: float) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=gen) * (hi - lo) + lo

    model = MODNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            elif isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(uniform([c], 0.5, 1.5))
                module.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                module.running_var.copy_(uniform([c], 0.5, 2.0))
            elif isinstance(module, torch.nn.Linear):
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
        # keep the matte away from saturation so parity is tested on the
        # sigmoid's steep part, where errors show
        model.f_branch.conv_f[1].layers[0].weight.mul_(0.5)
    return model.eval()


@contextlib.contextmanager
def official_instance_norm() -> Iterator[None]:
    """Export IBNorm the way the official code does (nn.InstanceNorm2d).

    The project's model writes InstanceNorm out as mean/variance; the real
    ONNX file was exported from the official code and therefore holds
    ``InstanceNormalization`` nodes. Swapping the forward only while exporting
    keeps fixtures faithful to what users download.
    """
    original = IBNorm.forward

    def forward(self: IBNorm, x: torch.Tensor) -> torch.Tensor:
        bn_x = self.bnorm(x[:, : self.bnorm_channels].contiguous())
        in_x = F.instance_norm(x[:, self.bnorm_channels :].contiguous(), eps=INSTANCE_NORM_EPS)
        return torch.cat((bn_x, in_x), 1)

    IBNorm.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        IBNorm.forward = original  # type: ignore[method-assign]


@contextlib.contextmanager
def official_se_block() -> Iterator[None]:
    """Export the SE block the way the official code writes it.

    The official ``SEBlock.forward`` reads ``b, c`` from ``x.size()`` and uses
    ``view`` and ``expand_as``; exported, that is the Shape/Gather/Unsqueeze/
    Concat/Reshape/Expand chain the real file carries, which a converter must
    follow. The project's model writes the same maths as ``flatten`` and indexing.
    """
    original = SEBlock.forward

    def forward(self: SEBlock, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        w = self.pool(x).view(b, c)
        w = self.fc(w).view(b, c, 1, 1)
        return x * w.expand_as(x)

    SEBlock.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        SEBlock.forward = original  # type: ignore[method-assign]


def _torchscript_export(
    model: MODNet, path: str, opset: int, dynamic: bool, official_in: bool, official_se: bool = False
) -> None:
    dummy = torch.randn(1, 3, STATIC_SIZE, STATIC_SIZE, generator=torch.Generator().manual_seed(1))
    axes = {0: "batch_size", 2: "height", 3: "width"}
    with contextlib.ExitStack() as ctx, warnings.catch_warnings():
        if official_in:
            ctx.enter_context(official_instance_norm())
        if official_se:
            ctx.enter_context(official_se_block())
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            path,
            input_names=["input"],
            output_names=["output"],
            opset_version=opset,
            dynamic_axes={"input": axes, "output": axes} if dynamic else None,
            do_constant_folding=True,
            dynamo=False,
        )


def folded_constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Constant`` nodes feeding a Resize's scales or a Concat, stored as initializers instead.

    Where the PyTorch 1.7 exporter (the real file's producer) kept those folded
    values: its file holds the 9 Resize scales and the SE block's two ``[1]``
    shape pieces as initializers and every other constant as a node. Today's
    exporter writes them all as nodes; this moves them back.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    wanted = {n.input[2] for n in graph.node if n.op_type == "Resize" and len(n.input) > 2}
    wanted |= {i for n in graph.node if n.op_type == "Concat" for i in n.input}
    moved, nodes = [], []
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            moved.append(tensor)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(moved)
    return out


def _dynamo_export(model: MODNet, path: str) -> None:
    dummy = torch.randn(1, 3, STATIC_SIZE, STATIC_SIZE, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (dummy,), input_names=["input"], output_names=["output"], opset_version=18, dynamo=True
        )
        program.save(path)


def _save(model: onnx.ModelProto, path: str) -> None:
    onnx.checker.check_model(model)
    onnx.save(model, path)


def to_float16_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store every float tensor as float16, widened back by Cast nodes (model_fp16 style)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    casts: list[onnx.NodeProto] = []
    new_inits = []
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            arr = numpy_helper.to_array(init).astype(np.float16)
            new_inits.append(numpy_helper.from_array(arr, init.name + "_fp16"))
            casts.append(helper.make_node("Cast", [init.name + "_fp16"], [init.name], to=onnx.TensorProto.FLOAT))
        else:
            new_inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    nodes = list(casts)
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                arr = numpy_helper.to_array(attr.t).astype(np.float16)
                name = node.output[0]
                attr.t.CopyFrom(numpy_helper.from_array(arr, name + "_fp16"))
                node.output[0] = name + "_fp16"
                nodes.append(helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _linears_as_gemm(graph: onnx.GraphProto, arrays: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """Linear as MatMul(x, W^T) -> Gemm(x, W, transB=1), with W stored transposed back (in ``arrays``)."""
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in arrays and arrays[node.input[1]].ndim == 2:
            arrays[node.input[1]] = np.ascontiguousarray(arrays[node.input[1]].T)
            node = helper.make_node("Gemm", list(node.input), list(node.output), name=node.name, transB=1)
        nodes.append(node)
    return nodes


def _shuffled_topological(nodes: list[onnx.NodeProto], rng: random.Random) -> list[int]:
    """A random valid topological order of ``nodes`` (Kahn's algorithm, random choice among the ready)."""
    produced_by = {o: idx for idx, n in enumerate(nodes) for o in n.output}
    deps = [{produced_by[i] for i in n.input if i in produced_by} for n in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for idx, ds in enumerate(deps):
        for d in ds:
            users[d].append(idx)
    remaining = [len(ds) for ds in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    order = []
    while ready:
        idx = ready.pop(rng.randrange(len(ready)))
        order.append(idx)
        for u in users[idx]:
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle")
    return order


def anonymise(model: onnx.ModelProto, seed: int = DEFAULT_SEED) -> onnx.ModelProto:
    """Anonymous names, a shuffled topological order, Constant-node weights, Gemm linears."""
    rng = random.Random(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name for i in graph.initializer}
    keep = ({v.name for v in graph.input} | {v.name for v in graph.output}) - inits
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"onnx::{len(names) + 100}")

    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    new_nodes = _linears_as_gemm(graph, arrays)
    constant_nodes, new_inits = [], []
    for i, (name, arr) in enumerate(sorted(arrays.items())):
        tensor = numpy_helper.from_array(arr, rename(name))
        if i % 2 and arr.dtype == np.float32:
            constant_nodes.append(helper.make_node("Constant", [], [tensor.name], value=tensor))
        else:
            new_inits.append(tensor)
    for node in new_nodes:
        node.name = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    nodes = constant_nodes + new_nodes
    order = _shuffled_topological(nodes, rng)
    for k, idx in enumerate(order):
        nodes[idx].name = f"node_{k}"
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    for vi in list(graph.input):
        if vi.name in inits:
            graph.input.remove(vi)
    del graph.value_info[:]
    return out


def _simplify(src: str, dst: str) -> None:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):
        slim = onnxslim.slim(onnx.load(src))
    _save(slim, dst)


def _ort_optimise(src: str, dst: str, extended: bool = False) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if extended else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    opts.optimized_model_filepath = dst
    ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


# the flavour resolve.synthetic_fallback generates: the real file's layout
FALLBACK_FLAVOUR = "official"

def _official_export(model: MODNet, path: str) -> None:
    """The official export's layout (see the module's table): opset 11, dynamic, its SE block and constants."""
    _torchscript_export(model, path, 11, True, True, official_se=True)
    _save(folded_constants_as_initializers(onnx.load(path)), path)


def export_flavour(model: MODNet, flavour: str, path: str, workdir: str) -> str:
    """Write ``model`` as one flavour of MODNet ONNX file to ``path``."""

    def base(name: str, maker: Callable[[str], None]) -> str:
        p = os.path.join(workdir, f"_base_{name}.onnx")
        if not os.path.exists(p):
            maker(p)
        return p

    official = lambda: base("official", lambda p: _official_export(model, p))  # noqa: E731
    webnn = lambda: base("webnn", lambda p: _torchscript_export(model, p, 13, False, True))  # noqa: E731
    if flavour == "webnn":
        _save(onnx.load(webnn()), path)
    elif flavour == "official":
        _save(onnx.load(official()), path)
    elif flavour == "opset17":
        _torchscript_export(model, path, 17, False, False)
    elif flavour == "dynamo":
        _dynamo_export(model, path)
    elif flavour == "simplified":
        _simplify(official(), path)
    elif flavour == "fp16":
        _save(to_float16_weights(onnx.load(webnn())), path)
    elif flavour == "anonymous":
        _save(anonymise(onnx.load(official())), path)
    elif flavour == "ort":
        _ort_optimise(official(), path)
    elif flavour == "ort_extended":
        _ort_optimise(official(), path, extended=True)
    else:
        raise ValueError(f"unknown flavour {flavour!r}; choose from {', '.join(FLAVOURS)}")
    return path


def generate(
    out_dir: str, flavours: Sequence[str] = FLAVOURS, seed: int = DEFAULT_SEED
) -> dict[str, str]:
    """Export each flavour to ``out_dir/modnet_<flavour>.onnx``; returns flavour -> path.

    Flavours, their packages and ``out_dir`` are checked first (:func:`check_generate`); each
    file is written atomically, so a failure leaves only complete files.
    """
    check_generate(out_dir, flavours)
    os.makedirs(out_dir, exist_ok=True)
    model = seeded_modnet(seed)
    paths: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as work:
        for flavour in flavours:
            final = os.path.join(out_dir, f"modnet_{flavour}.onnx")
            with atomic_path(final) as tmp:
                export_flavour(model, flavour, tmp, work)
            paths[flavour] = final
    return paths
