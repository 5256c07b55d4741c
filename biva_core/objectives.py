"""Objectives: L_1 (ELBO), L_K (importance weighted, chunked), L^{>k} (eq. 2), LLR^{>k}, KL per latent.

All bounds are per image in nats; `bits_per_dim` converts. Noise comes from `noise.NoiseStream`, the same
stream the served models draw from a request's seed, so PyTorch and Triton agree sample for sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .model import Biva, repeat_rows
from .noise import NoiseStream


def bits_per_dim(nats: torch.Tensor | float, n_dims: int) -> torch.Tensor | float:
    """-L / (hwc log 2): a bound in nats (a log-likelihood, negative) to bits per dimension (positive)."""
    return -nats / (n_dims * math.log(2.0))


def log_weights(model: Biva, x: torch.Tensor, eps: torch.Tensor, k: int | torch.Tensor = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One importance sample per image: (log w for L, log w for L^{>k}, analytic KL per group (B, G)).

    Both weights share the bottom-up pass and the noise (common random numbers, so LLR^{>k} has low
    variance). With k = 0 the second equals the first.
    """
    bu = model.bottom_up(x, eps)
    full = model.top_down(bu, eps, 0, 1.0, x=x)
    if isinstance(k, int) and k == 0:
        return full.log_w, full.log_w, full.kl
    part = model.top_down(bu, eps, k, 1.0, x=x)
    return full.log_w, part.log_w, full.kl


def iw_log_weights(model: Biva, x: torch.Tensor, eps: torch.Tensor, k: int | torch.Tensor = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S importance samples and J values of k per image, eps (B, S, N), k (B, J) (an int: J = 1): the log
    weight of every sample (B, S), L^{>k}'s of sample 0 for each k (B, J; J may be 0), and sample 0's
    analytic KL per group (B, G).

    `log_weights` for every sample, where the bottom-up stages that see x alone run once per image
    (Biva.bottom_up), and only sample 0 gets the second top-down passes, one per k (its bottom-up pass and
    noise shared), as in `evaluate_bounds`.
    """
    if isinstance(k, int):
        k = torch.full((x.shape[0], 1), k, dtype=torch.int64, device=x.device)
    S, J = eps.shape[1], k.shape[1]
    flat = eps.reshape(-1, eps.shape[2])  # (B * S, N), image-major
    bu = model.bottom_up(x, flat)
    full = model.top_down(bu, flat, 0, 1.0, x=repeat_rows(x, S))
    kl = full.kl.reshape(-1, S, full.kl.shape[1])[:, 0]  # (B, G)
    first = lambda t: t.reshape(-1, S, *t.shape[1:])[:, 0]  # noqa: E731  (B * S, ...) -> sample 0's (B, ...)
    # (B, ...) -> (J * B, ...), k-major: with J = 0 every reshape below keeps a 0 it can copy (ONNX's Reshape
    # reads a 0 in the target shape as "the input's size there")
    per_k = lambda t: t.unsqueeze(0).expand(J, *t.shape).reshape(-1, *t.shape[1:])  # noqa: E731
    part = model.top_down(bu.map(first).map(per_k), per_k(eps[:, 0]), k.T.reshape(-1), 1.0, x=per_k(x))
    return full.log_w.reshape(-1, S), part.log_w.reshape(J, x.shape[0]).T, kl


@dataclass
class Bounds:
    """Per-image bounds in nats, (B,) each; kl is (B, G)."""

    elbo: torch.Tensor  # L_1: the first importance sample's log weight
    iw: torch.Tensor  # L_K: log mean exp of K log weights (equals elbo when K = 1)
    l_gt_k: dict[int, torch.Tensor]  # k -> L^{>k}_1 (eq. 2), one sample, same noise as elbo
    kl: torch.Tensor  # analytic KL per latent group, first sample

    def llr(self, k: int) -> torch.Tensor:
        """LLR^{>k} = L_1 - L^{>k} (Havtorn et al., 2021): large for out-of-distribution inputs."""
        return self.elbo - self.l_gt_k[k]


@torch.no_grad()
def evaluate_bounds(model: Biva, x: torch.Tensor, stream: NoiseStream, iw_samples: int = 1,
                    ks: tuple[int, ...] = (), chunk: int = 64) -> Bounds:
    """L_1, L_K and L^{>k} for a batch, drawing noise from `stream` in chunks of at most `chunk` samples.

    Sample 0 gives L_1 and L^{>k}; samples 0..K-1 give L_K through a running log-sum-exp, so memory is
    O(chunk * B) whatever K is. The stream is consumed as (K, B, noise_dim) in order, in whatever chunks.
    """
    B = x.shape[0]
    lse = torch.full((B,), -math.inf, dtype=x.dtype, device=x.device)
    elbo = kl = None
    l_gt_k: dict[int, torch.Tensor] = {}
    done = 0
    while done < iw_samples:
        c = min(chunk, iw_samples - done)
        eps = stream.take((c, B, model.noise_dim), x.device, x.dtype).reshape(c * B, -1)  # (c*B, N)
        parts = []
        if done == 0:  # sample 0: L_1, KL and every L^{>k}, sharing one bottom-up pass
            e0 = eps[:B]
            bu = model.bottom_up(x, e0)
            full = model.top_down(bu, e0, 0, 1.0, x=x)
            elbo, kl = full.log_w, full.kl
            for k in ks:
                l_gt_k[k] = elbo if k == 0 else model.top_down(bu, e0, k, 1.0, x=x).log_w
            parts.append(elbo.unsqueeze(0))
            eps, c_rest = eps[B:], c - 1
        else:
            c_rest = c
        if c_rest:
            xr = x.unsqueeze(0).expand(c_rest, *x.shape).reshape(c_rest * B, *x.shape[1:])  # (c*B, C, H, W)
            parts.append(model(xr, eps).log_w.reshape(c_rest, B))
        lse = torch.logaddexp(lse, torch.logsumexp(torch.cat(parts, dim=0), dim=0))
        done += c
    return Bounds(elbo=elbo, iw=lse - math.log(iw_samples), l_gt_k=l_gt_k, kl=kl)


def training_loss(model: Biva, x: torch.Tensor, eps: torch.Tensor, free_bits: float, beta: float = 1.0
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative ELBO with free bits (Kingma et al., 2016) and a KL weight beta (warm-up) on the loss only.

    Each latent group's batch-mean KL counts as max(free_bits, KL), scaled by beta (Sonderby et al.'s
    warm-up ramps it from 0 to 1); the reported `elbo` is the true single-sample bound, unaffected by both.
    """
    out = model(x, eps)
    kl_group = out.kl.mean(dim=0)  # (G,)
    loss = -out.log_px.mean() + beta * torch.clamp(kl_group, min=free_bits).sum()
    stats = {"loss": loss.detach(), "elbo": out.log_w.mean().detach(), "kl": out.kl.sum(dim=1).mean().detach(),
             "kl_group": kl_group.detach()}
    return loss, stats
