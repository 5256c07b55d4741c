"""Noise from a seed for PyTorch: a thin torch wrapper over the contract's stream (biva_core.contract.noise_rng,
draw_noise), which the served front models draw from, so PyTorch and Triton agree draw for draw."""
from __future__ import annotations

import numpy as np
import torch

from .contract import draw_noise, noise_rng


class NoiseStream:
    """Standard normal float32 draws from one seed, consumed in order."""

    def __init__(self, seed: int | None):
        self.rng = noise_rng(seed)

    def take_numpy(self, shape: tuple[int, ...]) -> np.ndarray:
        return draw_noise(self.rng, shape)

    def take(self, shape: tuple[int, ...], device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.from_numpy(self.take_numpy(shape)).to(device=device, dtype=dtype)
