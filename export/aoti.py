"""The compiled route: each graph as an AOTInductor package (torch.export with the same dynamic axes as the
ONNX graph, compiled ahead of time by inductor), served by the python backend instead of ONNX Runtime.

Why: inductor fuses BIVA's elementwise work (the ELU before every convolution, the gates, the residual adds)
into the loops around its convolutions, which ONNX Runtime's CPU provider cannot; at batch 64 it is the
faster runtime here (README, Speed). One package per graph holds every batch size (a dynamic batch axis, as
the ONNX graph), so a server compiles nothing. Packages are validated against PyTorch at the same
tolerances as the ONNX graphs (onnx_export.compare_with_torch) before anything is written.
"""
from __future__ import annotations

from pathlib import Path

import torch

from biva_core.model import Biva

from biva_core.contract import GraphSpec, aoti_runner
from .graphs import GRAPH_MODULES
from .onnx_export import GraphReport, compare_with_torch, dynamic_axes, traced_inputs


class _Plain(torch.nn.Module):
    """A graph module returning a plain tuple (in the spec's output order): packages hold no named tuples."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        self.inner = graph  # not "graph": torch.fx keeps its own .graph on the exported module

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.inner(*inputs))


def compile_package(spec: GraphSpec, model: Biva, path: Path) -> None:
    """torch.export of the graph (dynamic batch and free axes) and AOTInductor's package at `path` (.pt2)."""
    module = _Plain(GRAPH_MODULES[spec.name](model).eval()).eval()
    with torch.no_grad():
        # Dim.DYNAMIC: torch.export works out the axes' relations and ranges itself (named ranges trip over guards
        # it cannot simplify on the scorer's sample axis); the package is then checked at 1..33 rows, S 1..5, J 0..2
        shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in dynamic_axes(t)} for t in spec.inputs)
        program = torch.export.export(module, traced_inputs(spec, model), dynamic_shapes=(shapes,))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def validate_package(spec: GraphSpec, model: Biva, path: Path, atol_scale: float = 1.0) -> GraphReport:
    """The package against PyTorch eager on fresh inputs, as validate_graph does for the ONNX graph."""
    run = aoti_runner(str(path))
    rep = compare_with_torch(spec, model, lambda feeds: run(*(feeds[n] for n in spec.input_names)),
                             atol_scale=atol_scale)
    rep.runtime = "AOTI"
    return rep
