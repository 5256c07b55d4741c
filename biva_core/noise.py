"""Noise from a seed: the one generator shared by PyTorch evaluation, ONNX validation and Triton.

ONNX Runtime's random ops give different draws on every run (and TensorRT ignores their seed), so every
graph takes its noise as an input. The served front models and the PyTorch reference both draw it here,
with numpy's PCG64 `default_rng(seed)`, in C order: a request's noise never travels over the network,
and the same seed gives the same numbers in every runtime. Draws are sequential, so taking (K, B, N) at
once or in chunks of K yields the same values.
"""
from __future__ import annotations

import numpy as np
import torch


class NoiseStream:
    """Standard normal float32 draws from one seed, consumed in order."""

    def __init__(self, seed: int | None):
        self.rng = np.random.default_rng(seed)

    def take_numpy(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32)

    def take(self, shape: tuple[int, ...], device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.from_numpy(self.take_numpy(shape)).to(device=device, dtype=dtype)
