"""Study: where an IW scorer call's time goes against the GEMM limit.
Fed: docs/speed_history.md, the 70% IW target (report.IW_PEAK_FRACTION).

Where an importance-weighted scorer call's time goes, against the GEMM limit (the 70% target for the IW likelihood).

    python -m studies.iw_floor --ckpt models/default28.pt --rows 32 --threads 2

One scorer call as biva_score makes it for L_K (one image, `rows` importance samples, no L^{>k} pass), four
figures in one process:

    gemm      the call's FLOPs (every Conv, ConvTranspose and Linear it runs, 2 per multiply-add, recorded by
              hooks on the modules) at the fp32 GEMM rate measured in the same run: the limit;
    floor     each of those operators run alone on inputs of its shape, in the faster of NCHW and channels-last
              memory, summed over the call: the call's time if everything else (the ELU before every
              convolution, the gates, residual adds, sampling, log-densities, copies) cost nothing;
    compiled  the whole call under torch.compile (inductor), which fuses that elementwise work into a few loops
              around the convolutions (the fastest runtime for this path in biva-bench, with the AOTI package);
    eager     the same call in PyTorch eager, for scale.

The fraction of the GEMM limit a route reaches is gemm / its time; the floor's is the most any runtime using
these convolution kernels can reach, and the compiled route's remainder (compiled - floor) is the elementwise
work it would have to shed to reach a target. Operator timings are medians of alternating rounds.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import torch
import torch.nn as nn
import torch.nn.functional as F

from biva_core.scoring import IW_CALL_ROWS


@dataclass(frozen=True)
class Op:
    """One convolution or linear map as a call runs it: the module's kind, input and weight shapes, geometry."""

    kind: str  # "conv", "conv_t", "linear"
    x: tuple[int, ...]
    w: tuple[int, ...]
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    output_padding: tuple[int, ...] = (0, 0)

    def flops(self) -> int:
        """2 x multiply-adds, biases left out (as bench.flops counts)."""
        if self.kind == "linear":  # x (..., in), w (out, in)
            return 2 * self.x[0] * self.w[0] * self.w[1]
        if self.kind == "conv_t":  # every input pixel meets the whole kernel: x (N, C, H, W), w (C, M, kh, kw)
            return 2 * self.x[0] * self.x[2] * self.x[3] * self.w[0] * self.w[1] * self.w[2] * self.w[3]
        n, _, h, w = self.x  # conv: x (N, C, H, W), w (M, C, kh, kw)
        ho = (h + 2 * self.padding[0] - self.w[2]) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.w[3]) // self.stride[1] + 1
        return 2 * n * self.w[0] * ho * wo * self.w[1] * self.w[2] * self.w[3]

    def runner(self, channels_last: bool) -> Callable[[], torch.Tensor]:
        """A call of this operator alone on random inputs, in NCHW or channels-last memory."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x, w = torch.randn(self.x), torch.randn(self.w)
        if self.kind == "linear":
            return lambda: F.linear(x, w)
        x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
        if self.kind == "conv_t":
            return lambda: F.conv_transpose2d(x, w, stride=self.stride, padding=self.padding,
                                              output_padding=self.output_padding)
        return lambda: F.conv2d(x, w, stride=self.stride, padding=self.padding)


def record_ops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Counter:
    """Op -> how many times one call of `module` runs it (forward hooks on its Conv2d, ConvTranspose2d and
    Linear submodules)."""
    seen: Counter = Counter()

    def hook(mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        x, w = tuple(args[0].shape), tuple(mod.weight.shape)
        if isinstance(mod, nn.Linear):
            seen[Op("linear", (math.prod(x[:-1]), x[-1]), w)] += 1
        else:
            kind = "conv_t" if isinstance(mod, nn.ConvTranspose2d) else "conv"
            seen[Op(kind, x, w, tuple(mod.stride), tuple(mod.padding),
                    tuple(getattr(mod, "output_padding", (0, 0))))] += 1

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _median_seconds(fns: dict, rounds: int, min_s: float = 0.05) -> dict:
    """key -> median seconds per call of fns[key](), over `rounds` alternating rounds of enough calls each to
    last about `min_s` (one warm-up call per function first)."""
    reps = {}
    for key, fn in fns.items():
        t = time.perf_counter()
        fn()
        reps[key] = max(1, int(min_s / max(time.perf_counter() - t, 1e-6)))
    times: dict = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps[key]):
                fn()
            times[key].append((time.perf_counter() - t) / reps[key])
    return {key: statistics.median(v) for key, v in times.items()}


def op_floor(ops: Counter, rounds: int) -> dict[Op, tuple[float, str]]:
    """Op -> (seconds per run, the faster layout "nchw" / "channels_last"), each operator timed alone."""
    fns = {(op, layout): op.runner(layout == "channels_last") for op in ops
           for layout in (("nchw",) if op.kind == "linear" else ("nchw", "channels_last"))}
    with torch.no_grad():
        med = _median_seconds(fns, rounds)
    best: dict[Op, tuple[float, str]] = {}
    for (op, layout), s in med.items():
        if op not in best or s < best[op][0]:
            best[op] = (s, layout)
    return best


def scorer_call(ckpt: Path, rows: int, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The scorer graph of a checkpoint (weight norm folded, eval) and one IW call's inputs: a random binary
    image, `rows` samples of noise, no value of k."""
    from biva_core.checkpoint import load_model
    from biva_export.graphs import ScorerGraph, inference_copy

    model = inference_copy(load_model(ckpt)[0])
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand((1, *model.cfg.image_shape), generator=g) > 0.5).float()
    noise = torch.randn((1, rows, model.noise_dim), generator=g)
    return ScorerGraph(model).eval(), (x, noise, torch.zeros((1, 0), dtype=torch.int64))


def floor_report(ckpt: Path, rows: int, threads: int, rounds: int) -> dict:
    """Every figure the CLI prints, as a dict (seconds per call, GFLOP, fractions of the GEMM limit)."""
    from biva_bench.flops import gemm_rate

    torch.set_num_threads(threads)
    graph, inputs = scorer_call(ckpt, rows)
    ops = record_ops(graph, inputs)
    floor = op_floor(ops, rounds)
    compiled = torch.compile(graph, dynamic=False)
    with torch.no_grad():
        compiled(*inputs)  # compiles; not timed
        calls = _median_seconds({"compiled": lambda: compiled(*inputs), "eager": lambda: graph(*inputs)}, rounds,
                                min_s=0.3)
    rate = gemm_rate(threads=threads)["gflops_per_s"]
    flops = sum(op.flops() * n for op, n in ops.items())
    t_gemm = flops / (rate * 1e9)
    t_floor = sum(floor[op][0] * n for op, n in ops.items())
    return {"rows": rows, "threads": threads, "gflop_per_call": flops / 1e9, "gemm_gflops_per_s": rate,
            "seconds": {"gemm": t_gemm, "floor": t_floor, **calls},
            "fraction_of_gemm": {k: t_gemm / t for k, t in {"floor": t_floor, **calls}.items()},
            "ops": [{"op": op, "runs": n, "gflop": op.flops() * n / 1e9, "seconds": floor[op][0] * n,
                     "layout": floor[op][1]} for op, n in sorted(ops.items(), key=lambda kv: -floor[kv[0]][0] * kv[1])]}


def _describe(op: Op) -> str:
    x = "x".join(map(str, op.x))
    if op.kind == "linear":
        return f"linear {x} -> {op.w[0]}"
    k = "x".join(map(str, op.w[2:]))
    out = op.w[1] if op.kind == "conv_t" else op.w[0]
    return f"{op.kind} {x} -> {out} ch, {k} stride {op.stride[0]}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=Path("models/default28.pt"),
              show_default=True, help="Checkpoint whose scorer graph is measured.")
@click.option("--rows", default=IW_CALL_ROWS, show_default=True, help="Importance samples in the call (as biva_score).")
@click.option("--threads", default=2, show_default=True, help="Intra-op threads (the served layout: 1 per instance).")
@click.option("--rounds", default=5, show_default=True, help="Alternating timed rounds; medians are reported.")
@click.option("--top", default=12, show_default=True, help="Operator shapes listed, slowest first.")
def main(ckpt: Path, rows: int, threads: int, rounds: int, top: int) -> None:
    r = floor_report(ckpt, rows, threads, rounds)
    s, f = r["seconds"], r["fraction_of_gemm"]
    click.echo(f"one scorer call: 1 image x {rows} samples, {threads} threads; {r['gflop_per_call']:.2f} GFLOP in "
               f"convolutions and linear maps; fp32 GEMM {r['gemm_gflops_per_s']:.0f} GFLOP/s (same run)")
    for op in r["ops"][:top]:
        click.echo(f"  {op['seconds'] * 1e3:7.2f} ms  {op['gflop']:6.3f} GFLOP  x{op['runs']:<3d} "
                   f"{_describe(op['op'])} ({op['layout']})")
    for name in ("gemm", "floor", "compiled", "eager"):
        frac = "" if name == "gemm" else f"  {f[name]:.2f} of the GEMM limit"
        click.echo(f"{name:9s} {s[name] * 1e3:8.2f} ms per call{frac}")
    budget = s["gemm"] / 0.7
    click.echo(f"0.70 of the limit is {budget * 1e3:.2f} ms per call: {(budget - s['floor']) * 1e3:.2f} ms left for "
               f"everything but the convolutions and linear maps, against {(s['compiled'] - s['floor']) * 1e3:.2f} ms "
               "the compiled call spends there now")


if __name__ == "__main__":
    main()
