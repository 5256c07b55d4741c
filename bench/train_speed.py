"""Training throughput per default28-like configuration: how the shipped model's width and depth were chosen.

    python -m biva_bench.train_speed

One Adamax step on a batch of 64 random binary 28x28 images, median of 6 steps, 2 torch threads;
prints images/s and the parameter count per configuration.
"""
from __future__ import annotations

import time

import torch

from biva_core.config import StageSpec, preset
from biva_core.model import Biva
from biva_core.objectives import training_loss

CONFIGS = [  # (feature maps, dense latent sizes bottom-up, M)
    (32, (32, 24, 16, 8), 2),
    (32, (32, 24, 16, 12, 8), 2),
    (48, (32, 24, 16, 8), 2),
    (64, (32, 24, 16, 8), 1),
    (32, (32, 24, 16, 8), 3),
]


def config(channels: int, dims: tuple[int, ...], m: int):
    stages = [StageSpec(channels, 3, 2, dims[0])]
    stages += [StageSpec(channels, 3, 2 if i == len(dims) else 1, d) for i, d in enumerate(dims[1:], 2)]
    return preset("default28", stages=tuple(stages), m_layers=m, dense_bottleneck=8)


def images_per_second(channels: int, dims: tuple[int, ...], m: int, batch: int = 64, steps: int = 6) -> tuple[float, int]:
    model = Biva(config(channels, dims, m))
    opt = torch.optim.Adamax(model.parameters(), 2e-3)
    x = (torch.rand(batch, 1, 28, 28) > 0.5).float()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss, _ = training_loss(model, x, torch.randn(batch, model.noise_dim), 2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return batch / sorted(times)[len(times) // 2], sum(p.numel() for p in model.parameters())


def main() -> None:
    torch.set_num_threads(2)
    for channels, dims, m in CONFIGS:
        ips, n = images_per_second(channels, dims, m)
        print(f"maps {channels:3d}  L {len(dims)}  M {m}  params {n / 1e6:5.2f} M  {ips:6.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
