"""studies.iw_floor: the operator account behind the README's IW-vs-GEMM analysis."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def test_recorded_ops_match_torch_flop_counter_and_shapes(tiny_ckpt: Path) -> None:
    """The FLOPs of the recorded convolutions and linear maps equal torch's FlopCounterMode on the same call (an
    independent count), and each recorded operator, rerun alone, gives the output shape its module gave."""
    from torch.utils.flop_counter import FlopCounterMode

    from studies.iw_floor import record_ops, scorer_call

    rows = int(torch.randint(3, 9, ()).item())
    graph, inputs = scorer_call(tiny_ckpt, rows, seed=int(torch.randint(2**31, ()).item()))
    ops = record_ops(graph, inputs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph(*inputs)
    assert sum(op.flops() * n for op, n in ops.items()) == counter.get_total_flops() > 0
    assert {op.kind for op in ops} >= {"conv", "conv_t", "linear"}, ops
    assert any(op.x[0] == rows for op in ops) and any(op.x[0] == 1 for op in ops), "per-sample and per-image ops"

    module_out: set[tuple[int, ...]] = set()
    hooks = [m.register_forward_hook(lambda _m, _a, out: module_out.add(tuple(out.shape)))
             for m in graph.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    with torch.no_grad():
        graph(*inputs)
        rerun = {tuple(op.runner(channels_last=op.kind != "linear")().shape) for op in ops}
    for h in hooks:
        h.remove()
    assert rerun == module_out


def test_cli_reports_every_route_against_the_gemm_limit(tiny_ckpt: Path) -> None:
    from click.testing import CliRunner

    from studies.iw_floor import main

    r = CliRunner().invoke(main, ["--ckpt", str(tiny_ckpt), "--rows", "4", "--threads", "1", "--rounds", "1",
                                  "--top", "3"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert sum(line.startswith("  ") and "GFLOP" in line for line in lines) == 3, r.output
    for route in ("floor", "compiled", "eager"):
        line = next(line for line in lines if line.startswith(route))
        assert "of the GEMM limit" in line and float(line.split()[1]) > 0, line
    assert "0.70 of the limit" in lines[-1], r.output
