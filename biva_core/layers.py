"""Building blocks: weight-normalised gated ResNet layers (PixelCNN++ style), latent heads and embeddings."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from .distributions import DiagGaussian, softplus


def resample(in_ch: int, out_ch: int, ratio: int, up: bool) -> nn.Module:
    """A linear map between feature maps whose resolutions differ by `ratio` (1: a 1x1 conv)."""
    if ratio == 1:
        return weight_norm(nn.Conv2d(in_ch, out_ch, 1))
    conv = nn.ConvTranspose2d if up else nn.Conv2d
    return weight_norm(conv(in_ch, out_ch, ratio, stride=ratio))


def conv(in_ch: int, out_ch: int, kernel: int, stride: int, up: bool) -> nn.Module:
    """Same-padded conv; with stride 2 it halves (or, with up, doubles) the resolution."""
    if up and stride > 1:
        return weight_norm(nn.ConvTranspose2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2,
                                              output_padding=stride - 1))
    return weight_norm(nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2))


class ResLayer(nn.Module):
    """One ResNet layer f_{i,j} / g_{i,j}: gated residual unit with an optional skip input.

    The paper concatenates the skip feature map d_{i+1,j} to the layer's output (eq. 5, 8); here the skip
    enters through its own linear map added inside the unit, which is a concatenation followed by a linear
    layer, written without materialising the concatenation.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, up: bool, skip_ch: int,
                 skip_ratio: int, dropout: float):
        super().__init__()
        self.conv1 = conv(in_ch, out_ch, kernel, stride, up)
        self.conv2 = weight_norm(nn.Conv2d(out_ch, 2 * out_ch, kernel, padding=kernel // 2))
        same = in_ch == out_ch and stride == 1
        self.shortcut = nn.Identity() if same else resample(in_ch, out_ch, stride, up)
        self.skip_proj = resample(skip_ch, out_ch, skip_ratio, up) if skip_ch else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        a = self.conv1(F.elu(x))
        if self.skip_proj is not None and skip is not None:
            a = a + self.skip_proj(F.elu(skip))
        a = self.drop(F.elu(a))
        a, gate = self.conv2(a).chunk(2, dim=1)
        return self.shortcut(x) + a * torch.sigmoid(gate)


class Block(nn.Module):
    """M ResNet layers between two stochastic layers.

    Going down in resolution (bottom-up) the stride is taken by the first layer; going up (top-down) by
    the last, so that in both directions the inner layers run at the lower resolution. `skip_ratios[j]`
    is the resolution ratio between the skip feature map fed to layer j and that layer's output (one
    entry per layer: its length is M).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, up: bool, skip_ch: int,
                 skip_ratios: list[int], dropout: float):
        super().__init__()
        m_layers = len(skip_ratios)  # one skip ratio per layer
        strided = m_layers - 1 if up else 0
        self.layers = nn.ModuleList(
            ResLayer(in_ch if j == 0 else out_ch, out_ch, kernel, stride if j == strided else 1, up, skip_ch,
                     skip_ratios[j], dropout)
            for j in range(m_layers)
        )

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Returns every layer's output (d_{i,1..M}), which the next block takes as skips."""
        outs = []
        for j, layer in enumerate(self.layers):
            x = layer(x, skips[j] if skips is not None else None)
            outs.append(x)
        return outs


class GaussianHead(nn.Module):
    """Maps a feature map to `n_groups` diagonal Gaussians over flat latents (B, n)."""

    def __init__(self, in_ch: int, hw: tuple[int, int], z_dim: int, dense: bool, n_groups: int, min_std: float,
                 bottleneck: int = 0, kernel: int = 3):
        super().__init__()
        self.dense, self.n_groups, self.min_std = dense, n_groups, min_std
        out = 2 * n_groups * z_dim
        # dense latents: an optional 1x1 conv to `bottleneck` maps before flattening keeps the linear small
        self.squeeze = weight_norm(nn.Conv2d(in_ch, bottleneck, 1)) if (dense and bottleneck) else None
        self.pad = None
        if dense:
            self.net = weight_norm(nn.Linear((bottleneck or in_ch) * hw[0] * hw[1], out))
        elif kernel % 2:
            self.net = weight_norm(nn.Conv2d(in_ch, out, kernel, padding=kernel // 2))
        else:
            # an even kernel (the natural presets' 16x16, 8x8, 4x4 heads) pads as TensorFlow's SAME: the extra
            # row and column at the end, so the latent keeps the feature map's resolution
            lo = (kernel - 1) // 2
            self.pad = nn.ZeroPad2d((lo, kernel - 1 - lo, lo, kernel - 1 - lo))
            self.net = weight_norm(nn.Conv2d(in_ch, out, kernel))

    def forward(self, h: torch.Tensor) -> list[DiagGaussian]:
        h = F.elu(h)
        if self.squeeze is not None:
            h = F.elu(self.squeeze(h))
        if self.pad is not None:
            h = self.pad(h)
        raw = self.net(h.flatten(1)) if self.dense else self.net(h)
        parts = raw.chunk(2 * self.n_groups, dim=1)
        return [DiagGaussian(parts[2 * g].flatten(1), softplus(parts[2 * g + 1].flatten(1)) + self.min_std)
                for g in range(self.n_groups)]


class LatentEmbed(nn.Module):
    """Maps flat latents (B, n_groups * n) back to a feature map at the latent's resolution."""

    def __init__(self, z_dim: int, n_groups: int, dense: bool, hw: tuple[int, int], channels: int,
                 bottleneck: int = 0):
        super().__init__()
        self.dense, self.hw = dense, hw
        self.net = self.expand = None
        if dense:
            self.out_ch = channels
            self.mid_ch = bottleneck or channels
            self.net = weight_norm(nn.Linear(n_groups * z_dim, self.mid_ch * hw[0] * hw[1]))
            if bottleneck:
                self.expand = weight_norm(nn.Conv2d(bottleneck, channels, 1))
        else:
            self.out_ch = n_groups * z_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w = self.hw
        if self.dense:
            out = self.net(z).reshape(z.shape[0], self.mid_ch, h, w)  # (B, C, H, W)
            return self.expand(F.elu(out)) if self.expand is not None else out
        # flat layout of a conv group is (z_dim, H, W) row-major, so concatenated groups stack on channels
        return z.reshape(z.shape[0], self.out_ch, h, w)
