"""The physical limit: FLOPs per image of each graph, and the machine's fp32 GEMM rate.

FLOPs are counted twice, independently: from the ONNX graph (Conv, ConvTranspose, MatMul and Gemm nodes,
shapes from ONNX shape inference with the batch fixed to 1) and from the PyTorch module with
torch.utils.flop_counter.FlopCounterMode. Both count a multiply-add as 2 FLOPs and ignore biases and
element-wise ops, so they are a lower bound on the work and the right numerator against a GEMM rate.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .measure import time_calls

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    out = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _node_flops(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int | None:
    """2 x multiply-adds of one node, or None when a shape it needs is unknown."""
    get = lambda i: shapes.get(node.input[i]) if len(node.input) > i else None  # noqa: E731
    y = shapes.get(node.output[0])
    if node.op_type == "Conv":  # Y (N, M, *out), W (M, C/g, *k)
        w = get(1)
        return 2 * math.prod(y) * math.prod(w[1:]) if _known(y) and _known(w) else None
    if node.op_type == "ConvTranspose":  # X (N, C, *in), W (C, M/g, *k)
        x, w = get(0), get(1)
        return 2 * math.prod(x) * math.prod(w[1:]) if _known(x) and _known(w) else None
    if node.op_type == "MatMul":  # Y (..., M, N) = A (..., M, K) @ B (..., K, N)
        a = get(0)
        return 2 * math.prod(y) * a[-1] if _known(y) and _known(a) else None
    if node.op_type == "Gemm":
        a = get(0)
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        return 2 * math.prod(y) * (a[0] if trans_a else a[1]) if _known(y) and _known(a) else None
    return 0


def onnx_flops_per_row(path: Path, free: dict[str, int] | None = None) -> dict[str, Any]:
    """FLOPs of one graph row (batch 1; the graph's other free axes, the scorer's samples and values of k, at
    their sizes in `free` by name, else 1), counted over the ONNX graph's Conv/ConvTranspose/MatMul/Gemm nodes."""
    model = onnx.load(str(path))
    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    for inp in model.graph.input:  # fix every dynamic axis so every shape is concrete
        for i, dim in enumerate(inp.type.tensor_type.shape.dim):
            if i == 0 or not dim.HasField("dim_value"):
                size = 1 if i == 0 else (free or {}).get(dim.dim_param, 1)
                dim.Clear()
                dim.dim_value = size
    try:  # onnxruntime's symbolic inference follows the Shape -> Gather -> Concat -> Reshape chains
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # of the tracing exporter

        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - fall back to ONNX's own inference
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shapes(model)
    by_op: dict[str, int] = {}
    unknown = []
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        f = _node_flops(node, shapes)
        if f is None:
            unknown.append(node.name or node.op_type)
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + f
    return {"total": sum(by_op.values()), "by_op": by_op, "nodes_without_shapes": unknown,
            "complete": not unknown}


def torch_flops_per_row(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of the PyTorch module on a batch of inputs, divided by the batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops()) // inputs[0].shape[0]


def gemm_rate(n: int = 2048, threads: int = 2, reps: int = 10) -> dict[str, Any]:
    """fp32 GEMM rate of this machine: torch n x n x n matmul with `threads` threads (median of `reps`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        c = torch.empty(n, n)
        times = time_calls(lambda: torch.matmul(a, b, out=c), reps)
    finally:
        torch.set_num_threads(old)
    flops = 2 * n ** 3
    return {"n": n, "threads": threads, "reps": reps, "gflops_per_s": flops / float(np.median(times)) / 1e9,
            "gflops_per_s_best": flops / min(times) / 1e9, "seconds_median": float(np.median(times))}
