"""Study: training throughput per configuration and speed lever.
Fed: docs/training.md, docs/ood.md (the shipped model's width and depth).

Training throughput on this CPU: how the shipped model's width and depth were chosen, and what each
speed lever buys for a study candidate.

    python -m studies.train_speed                       # images/s per default28-like configuration
    python -m studies.train_speed --levers hvae48       # eager vs compiled, channels-last, batch size, threads

One Adamax step on a batch of random binary 28x28 images, warm-up steps first (compilation included there),
then the median of the timed steps; `--levers` interleaves the levers step by step over rounds, so load on
a shared machine slows each alike. `--levers` also checks that every lever computes the same loss and
gradients as the eager step on the same batch and weights (relative 1e-4), and prints the max difference.
"""
from __future__ import annotations

import time

import click
import torch

from biva_core.config import BivaConfig, StageSpec, preset
from biva_core.model import Biva
from biva_core.objectives import training_loss

CONFIGS = [  # (feature maps, dense latent sizes bottom-up, M)
    (32, (32, 24, 16, 8), 2),
    (32, (32, 24, 16, 12, 8), 2),
    (48, (32, 24, 16, 8), 2),
    (64, (32, 24, 16, 8), 1),
    (32, (32, 24, 16, 8), 3),
]
# (name, batch, threads, compiled, channels_last); the first is the reference every lever is checked against
LEVERS = [
    ("eager, batch 64, 2 threads", 64, 2, False, False),
    ("eager, channels-last", 64, 2, False, True),
    ("compiled", 64, 2, True, False),
    ("compiled, channels-last", 64, 2, True, True),
    ("compiled, batch 128", 128, 2, True, False),
    ("compiled, 1 thread", 64, 1, True, False),
]


def config(channels: int, dims: tuple[int, ...], m: int) -> BivaConfig:
    stages = [StageSpec(channels, 3, 2, dims[0])]
    stages += [StageSpec(channels, 3, 2 if i == len(dims) else 1, d) for i, d in enumerate(dims[1:], 2)]
    return preset("default28", stages=tuple(stages), m_layers=m, dense_bottleneck=8)


def _step_fn(model: Biva, compiled: bool):
    fn = torch.compile(training_loss) if compiled else training_loss
    lam, beta = torch.tensor(2.0), torch.tensor(1.0)

    def step(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss, _ = fn(model, x, eps, lam, beta)
        loss.backward()
        return loss.detach()

    return step


def prepare(cfg: BivaConfig, batch: int, compiled: bool = False, channels_last: bool = False, seed: int = 0):
    """(one timed optimiser step as a closure, loss and gradients of the first step on fixed batch and weights)."""
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = Biva(cfg).eval().to(memory_format=fmt)  # eval: no dropout draws, every lever computes one function
    opt = torch.optim.Adamax(model.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, 1, 28, 28, generator=gen) > 0.5).float().contiguous(memory_format=fmt)
    eps = torch.randn(batch, model.noise_dim, generator=gen)
    step = _step_fn(model, compiled)
    loss0 = step(x, eps)  # before any update: the numbers every lever must reproduce
    grad0 = torch.cat([p.grad.flatten() for p in model.parameters()])

    def timed() -> float:
        t = time.perf_counter()
        step(x, eps)
        opt.step()
        return time.perf_counter() - t

    return timed, loss0, grad0


def measure(cfg: BivaConfig, batch: int, compiled: bool = False, channels_last: bool = False, warmup: int = 3,
            steps: int = 6, seed: int = 0) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(images/s of one optimiser step, median of `steps` after `warmup`, and the first step's loss and grads)."""
    timed, loss0, grad0 = prepare(cfg, batch, compiled, channels_last, seed)
    times = [timed() for _ in range(warmup + steps)][warmup:]
    return batch / sorted(times)[len(times) // 2], loss0, grad0


def run_levers(cfg: BivaConfig, rounds: int = 10, warmup: int = 3) -> None:
    """Every lever set up (and compiled) first, then `rounds` rounds of one step per lever, interleaved, so a
    busy machine slows every lever alike; medians per lever, ratios against the eager reference."""
    setups = []
    for name, batch, threads, compiled, cl in LEVERS:
        torch.set_num_threads(threads)
        timed, loss, grad = prepare(cfg, batch, compiled, cl)
        for _ in range(warmup):
            timed()
        setups.append((name, batch, threads, timed, loss, grad))
    times: list[list[float]] = [[] for _ in setups]
    for _ in range(rounds):
        for i, (_, _, threads, timed, _, _) in enumerate(setups):
            torch.set_num_threads(threads)
            times[i].append(timed())
    _, _, _, _, ref_loss, ref_grad = setups[0]
    ref_ips = None
    for (name, batch, _, _, loss, grad), ts in zip(setups, times):
        ips = batch / sorted(ts)[len(ts) // 2]
        ref_ips = ref_ips or ips
        diff = ""
        if batch == 64:
            rel = float((grad - ref_grad).abs().max() / ref_grad.abs().max())
            assert abs(float(loss - ref_loss)) <= 1e-4 * abs(float(ref_loss)) and rel <= 1e-4, (name, loss, rel)
            diff = f"  loss diff {abs(float(loss - ref_loss)):.1e}, grad max rel diff {rel:.1e}"
        click.echo(f"{name:28s} {ips:7.1f} images/s  {ips / ref_ips:5.2f}x{diff}")


@click.command()
@click.option("--levers", "candidate", default=None,
              help="A candidate of the OOD study (python -m studies.ood_study): measure the speed levers on it.")
def main(candidate: str | None) -> None:
    """Training images/s per configuration, or per speed lever for one model."""
    if candidate:
        from .ood_study import CANDIDATES

        run_levers(CANDIDATES[candidate][0])
        return
    torch.set_num_threads(2)
    for channels, dims, m in CONFIGS:
        cfg = config(channels, dims, m)
        ips, _, _ = measure(cfg, 64)
        n = sum(p.numel() for p in Biva(cfg).parameters())
        click.echo(f"maps {channels:3d}  L {len(dims)}  M {m}  params {n / 1e6:5.2f} M  {ips:6.1f} images/s")


if __name__ == "__main__":
    main()
