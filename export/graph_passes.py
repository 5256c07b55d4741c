"""Rewrites of an exported ONNX graph that keep its numbers and make ONNX Runtime's CPU provider faster.

ELU (alpha 1) is BIVA's only activation: 34 nodes in the sampler, 78 in the encoder, 120 in the scorer.
ONNX Runtime's CPU `Elu` kernel runs about five times slower than its `Exp` on the same tensor, and the
NCHWc layout pass cannot keep a blocked tensor through it, so each one costs a layout reorder as well
(`python -m studies.ort_profile`). The same function written with operators that have vectorised
kernels,

    ELU(x) = Max(x, Exp(Min(x, 0)) - 1),

is exact in real arithmetic (for x > 0, Exp(0) - 1 = 0 < x; for x <= 0, e^x - 1 >= x), never overflows
(the exponent is at most 0) and differs from the kernel by float rounding only. `decompose_elu` writes it;
`compose_elu` turns the pattern back into single `Elu` nodes (for a runtime whose Elu is fast, such as
the CUDA provider or TensorRT, and for the bench's same-run comparison). Both passes return the number of
nodes they rewrote; every exported graph is validated against PyTorch after them.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

ELU_FORMS = ("decomposed", "native")  # how biva-export writes ELU: the four-operator form, or the Elu node
_ZERO, _ONE = "biva_elu_zero", "biva_elu_one"  # the pass's scalar constants (initializers)
_CHAIN = ("Min", "Exp", "Sub", "Max")  # the decomposed form, in graph order


def _alpha(node: onnx.NodeProto) -> float:
    return next((a.f for a in node.attribute if a.name == "alpha"), 1.0)


def _add_scalars(graph: onnx.GraphProto) -> None:
    have = {t.name for t in graph.initializer}
    for name, value in ((_ZERO, 0.0), (_ONE, 1.0)):
        if name not in have:
            graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))


def decompose_elu(model: onnx.ModelProto) -> int:
    """Replace every `Elu` with alpha 1 in the main graph by Min, Exp, Sub, Max, in place; returns how many.
    An Elu with another alpha is left as it is (BIVA has none)."""
    graph, nodes, n = model.graph, [], 0
    for node in graph.node:
        if node.op_type != "Elu" or node.domain not in ("", "ai.onnx") or _alpha(node) != 1.0:
            nodes.append(node)
            continue
        x, y, p = node.input[0], node.output[0], f"{node.name or 'elu'}_{n}"
        nodes += [helper.make_node("Min", [x, _ZERO], [f"{p}_neg"], name=f"{p}_min"),
                  helper.make_node("Exp", [f"{p}_neg"], [f"{p}_exp"], name=f"{p}_exp"),
                  helper.make_node("Sub", [f"{p}_exp", _ONE], [f"{p}_em1"], name=f"{p}_sub"),
                  helper.make_node("Max", [x, f"{p}_em1"], [y], name=f"{p}_max")]
        n += 1
    if n:
        graph.ClearField("node")
        graph.node.extend(nodes)
        _add_scalars(graph)
    return n


def _chain_at(nodes: list[onnx.NodeProto], i: int) -> str | None:
    """The input x where nodes[i:i+4] is decompose_elu's pattern, else None."""
    chain = nodes[i:i + 4]
    if tuple(n.op_type for n in chain) != _CHAIN:
        return None
    mn, ex, sub, mx = chain
    x = mn.input[0]
    ok = (list(mn.input) == [x, _ZERO] and list(ex.input) == [mn.output[0]]
          and list(sub.input) == [ex.output[0], _ONE] and list(mx.input) == [x, sub.output[0]])
    return x if ok else None


def compose_elu(model: onnx.ModelProto) -> int:
    """The inverse of decompose_elu, in place: each of its four-node patterns back to one `Elu`; returns how
    many. The pass's intermediate tensors are used nowhere else, so dropping them is safe."""
    graph, old, nodes, n, i = model.graph, list(model.graph.node), [], 0, 0
    while i < len(old):
        x = _chain_at(old, i)
        if x is None:
            nodes.append(old[i])
            i += 1
            continue
        nodes.append(helper.make_node("Elu", [x], [old[i + 3].output[0]], name=f"elu_{n}", alpha=1.0))
        n, i = n + 1, i + 4
    if n:
        graph.ClearField("node")
        graph.node.extend(nodes)
        used = {name for node in nodes for name in node.input}
        keep = [t for t in graph.initializer if t.name not in (_ZERO, _ONE) or t.name in used]
        graph.ClearField("initializer")
        graph.initializer.extend(keep)
    return n


def apply_elu_form(model: onnx.ModelProto, form: str) -> int:
    """Bring the graph's ELUs to `form` (one of ELU_FORMS); returns how many nodes were rewritten."""
    if form not in ELU_FORMS:
        raise ValueError(f"ELU form must be one of {ELU_FORMS}, got {form!r}")
    return decompose_elu(model) if form == "decomposed" else compose_elu(model)
