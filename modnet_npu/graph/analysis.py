"""Architecture analysis of a MODNet ONNX graph.

What a deployment engineer wants to know about a file before trusting it: its
input/output contract (static or dynamic), opset, op inventory, the table of the
69 convolutions (which layer each ONNX node is, kernel, stride, channels,
branch), parameter counts, and multiply-accumulates at a given input size.
The layer table comes from the converter's structural matching, so it holds for
anonymised and reordered graphs too. CLI prints it; ``--json`` for machines.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from modnet_npu.conversion.convert import Conversion, ConvLabel, convert, describe
from modnet_npu.model.modnet import IBNorm, MODNet, check_input_size
from modnet_npu.graph.weights import GraphFacts, OnnxWeights, ValueInfo, read_weights, summarize

BRANCHES = {"backbone": "backbone", "lr_branch": "low-res", "hr_branch": "high-res", "f_branch": "fusion"}


@dataclass(frozen=True)
class ConvRow:
    index: int
    module: str
    branch: str
    onnx_node: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int
    out_height: int
    out_width: int
    macs: int


@dataclass(frozen=True)
class ArchReport:
    path: str
    opset: int
    producer: str
    input: ValueInfo
    output: ValueInfo
    static_input: bool
    num_nodes: int
    op_counts: dict[str, int]
    num_initializers: int
    num_constant_nodes: int
    num_weight_tensors: int  # stored tensors the network's layers read
    num_parameters: int  # in PyTorch form (BatchNorm unfolded)
    num_file_values: int  # float values stored in the file
    num_folded_batchnorms: int
    num_convolutions: int
    num_ibnorm: int
    num_linear: int
    size: tuple[int, int]
    batch: int
    macs: int
    convs: tuple[ConvRow, ...]

    @property
    def gflops(self) -> float:
        return 2 * self.macs / 1e9


def layer_costs(model: nn.Module, height: int, width: int) -> dict[str, tuple[int, int, int]]:
    """module name -> (out height, out width, MACs per image) for every Conv2d and Linear."""
    check_input_size(height, width)
    with torch.device("meta"):
        meta = MODNet(model.cfg) if isinstance(model, MODNet) else model
    names = {m: n for n, m in meta.named_modules()}
    costs: dict[str, tuple[int, int, int]] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            _, c, h, w = output.shape
            k = module.kernel_size[0] * module.kernel_size[1]
            costs[names[module]] = (h, w, h * w * c * (module.in_channels // module.groups) * k)
        else:
            costs[names[module]] = (1, 1, module.in_features * module.out_features)

    hooks = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            meta(torch.empty(1, 3, height, width, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return costs


def _conv_rows(model: nn.Module, report, costs: dict, batch: int) -> list[ConvRow]:
    """One row per convolution, in module order, with its ONNX node and cost."""
    nodes = {layer.module: layer.onnx_nodes for layer in report.layers}
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        h, w, macs = costs[name]
        rows.append(ConvRow(
            index=len(rows), module=name, branch=BRANCHES[name.split(".")[0]],
            onnx_node=nodes.get(name, ("?",))[0], in_channels=module.in_channels,
            out_channels=module.out_channels, kernel=module.kernel_size[0], stride=module.stride[0],
            groups=module.groups, out_height=h, out_width=w, macs=macs * batch,
        ))
    return rows


def analyse(
    source: str | OnnxWeights,
    height: int = 256,
    width: int = 256,
    batch: int = 1,
    conversion: Conversion | None = None,
    facts: GraphFacts | None = None,
) -> ArchReport:
    """Analyse a MODNet graph; pass ``conversion`` (and ``facts``) when already computed."""
    weights = source if isinstance(source, OnnxWeights) else read_weights(source)
    facts = facts or weights.facts()
    conversion = conversion or convert(weights)
    model, report = conversion.model, conversion.report
    costs = layer_costs(model, height, width)
    rows = _conv_rows(model, report, costs, batch)
    summary = summarize(weights)
    return ArchReport(
        path=weights.path,
        opset=facts.opset,
        producer=facts.producer,
        input=facts.inputs[0],
        output=facts.outputs[0],
        static_input=facts.inputs[0].is_static,
        num_nodes=facts.num_nodes,
        op_counts=dict(facts.op_counts),
        num_initializers=summary.num_initializers,
        num_constant_nodes=summary.num_constant_nodes,
        num_weight_tensors=report.num_source_tensors_used,
        num_parameters=report.num_parameters,
        num_file_values=summary.num_float_values,
        num_folded_batchnorms=report.num_folded_batchnorms,
        num_convolutions=len(rows),
        num_ibnorm=sum(1 for m in model.modules() if isinstance(m, IBNorm)),
        num_linear=sum(1 for m in model.modules() if isinstance(m, nn.Linear)),
        size=(height, width),
        batch=batch,
        macs=sum(c[2] for c in costs.values()) * batch,
        convs=tuple(rows),
    )


def _shape(v: ValueInfo) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in v.shape) + "]"


def format_report(r: ArchReport) -> str:
    lines = [
        f"MODNet graph: {r.path}",
        f"  opset {r.opset}, {r.num_nodes} nodes" + (f", producer {r.producer}" if r.producer else ""),
        f"  input  {r.input.name} {r.input.dtype} {_shape(r.input)} ({'static' if r.static_input else 'dynamic'})",
        f"  output {r.output.name} {r.output.dtype} {_shape(r.output)}",
        f"  stored tensors: {r.num_initializers} initializers + {r.num_constant_nodes} Constant nodes; "
        f"{r.num_weight_tensors} read as weights",
        f"  parameters: {r.num_parameters:,} in PyTorch form; {r.num_file_values:,} float values in the file; "
        f"{r.num_folded_batchnorms} BatchNorms folded into convolutions",
        f"  layers: {r.num_convolutions} convolutions, {r.num_ibnorm} IBNorm, {r.num_linear} linear",
        f"  cost at {r.batch}x3x{r.size[0]}x{r.size[1]}: {r.macs / 1e9:.2f} G multiply-accumulates "
        f"({r.gflops:.2f} GFLOP)",
        "  ops: " + ", ".join(f"{op} {n}" for op, n in r.op_counts.items()),
        "",
        f"  {'#':>2} {'layer':<38} {'branch':<9} {'conv':<34} {'out':>9} {'MMAC':>8}  onnx node",
    ]
    for c in r.convs:
        conv = describe(ConvLabel("conv", c.out_channels, c.in_channels, c.kernel, c.kernel, c.stride, c.stride, c.groups))
        lines.append(
            f"  {c.index:>2} {c.module:<38} {c.branch:<9} {conv[5:]:<34} "
            f"{c.out_height:>4}x{c.out_width:<4} {c.macs / 1e6:>8.1f}  {c.onnx_node}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# counting operators
# --------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators a forward dispatches (a stand-in for accelerator launches)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


VIEW_OPS = {"view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand", "t", "transpose",
            "permute", "as_strided", "reshape", "alias", "detach", "flatten"}


def count_ops(model: nn.Module, x: torch.Tensor) -> tuple[int, int, Counter]:
    """(all operators, operators that launch a kernel i.e. not views, per-op counts) for one forward."""
    counter = OpCounter()
    with torch.inference_mode(), counter:
        model(x)
    kernels = sum(n for op, n in counter.ops.items() if op not in VIEW_OPS)
    return counter.total, kernels, counter.ops

