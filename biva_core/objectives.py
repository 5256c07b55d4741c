"""Objectives: L_1 (ELBO), L_K (importance weighted, chunked), L^{>k} (eq. 2), LLR^{>k}, KL per latent.

All values are per image in nats (`biva_core.stats.bits_per_dim` converts). Noise comes from `noise.NoiseStream`,
the stream the served models draw from a request's seed, so PyTorch and Triton agree draw for draw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .model import Biva, repeat_rows
from .scoring import ScoreRequest
from .noise import NoiseStream


def log_weights(model: Biva, x: torch.Tensor, eps: torch.Tensor, k: int | torch.Tensor = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One draw per image: (log w for L, log w for L^{>k}, analytic KL per group (B, G)).

    Both weights share the bottom-up pass and the noise (common random numbers, so LLR^{>k} has low
    variance). With k = 0 the second equals the first.
    """
    bu = model.bottom_up(x, eps)
    full = model.top_down(bu, eps, 0, 1.0, x=x)
    if isinstance(k, int) and k == 0:
        return full.log_w, full.log_w, full.kl
    part = model.top_down(bu, eps, k, 1.0, x=x)
    return full.log_w, part.log_w, full.kl


def draw_log_weights(model: Biva, x: torch.Tensor, eps: torch.Tensor, k: int | torch.Tensor = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S draws and J values of k per image, eps (B, S, N), k (B, J) (an int: J = 1): the log weight of every
    draw (B, S), of every draw's L^{>k} for each k (B, S, J; J may be 0), and every draw's analytic KL per
    group (B, S, G). What the scorer graph computes.

    `log_weights` for every draw, where the bottom-up stages that see x alone run once per image
    (Biva.bottom_up), and each k's top-down pass reuses the draw's bottom-up pass and noise.
    """
    if isinstance(k, int):
        k = torch.full((x.shape[0], 1), k, dtype=torch.int64, device=x.device)
    B, S, J = x.shape[0], eps.shape[1], k.shape[1]
    flat = eps.reshape(-1, eps.shape[2])  # (B * S, N), image-major
    bu = model.bottom_up(x, flat)
    xs = repeat_rows(x, S)
    full = model.top_down(bu, flat, 0, 1.0, x=xs)
    # (B * S, ...) -> (J * B * S, ...), k-major: with J = 0 every reshape below keeps a 0 it can copy (ONNX's
    # Reshape reads a 0 in the target shape as "the input's size there")
    per_k = lambda t: t.unsqueeze(0).expand(J, *t.shape).reshape(-1, *t.shape[1:])  # noqa: E731
    k_rows = k.T.unsqueeze(2).expand(J, B, S).reshape(-1)  # (J * B * S,), in per_k's order
    part = model.top_down(bu.map(per_k), per_k(flat), k_rows, 1.0, x=per_k(xs))
    return (full.log_w.reshape(B, S), part.log_w.reshape(J, B, S).permute(1, 2, 0),
            full.kl.reshape(B, S, full.kl.shape[1]))


@dataclass
class Bounds:
    """Per-image values in nats, (B,) each, kl (B, G), from the request's estimator (contract.ESTIMATORS):
    bounds on log p(x) for "sample" and "mean", scores for "mode"; L_K is always the importance-weighted bound."""

    elbo: torch.Tensor  # L_1 by the estimator
    iw: torch.Tensor | None  # L_K: log mean exp of K draws' log weights (equals elbo when K = 1, "sample")
    l_gt_k: dict[int, torch.Tensor]  # k -> L^{>k} (eq. 2) by the estimator, on the same draws as elbo
    kl: torch.Tensor  # analytic KL per latent group by the estimator

    def llr(self, k: int) -> torch.Tensor:
        """LLR^{>k} = L_1 - L^{>k} (Havtorn et al., 2021): large for out-of-distribution inputs."""
        return self.elbo - self.l_gt_k[k]


class _Sums:
    """The estimator's running sums of L_1, each L^{>k} and the KL over its draws."""

    def __init__(self, ks: tuple[int, ...]):
        self.ks, self.n, self.l1, self.kl = ks, 0, 0.0, 0.0
        self.lgk = {k: 0.0 for k in ks}

    def add(self, model: Biva, x: torch.Tensor, eps: torch.Tensor, draws: int) -> torch.Tensor:
        """`draws` draws of every image, eps (draws * B, N) draw-major; returns their log w (draws * B,)."""
        xr = x.repeat(draws, *([1] * (x.dim() - 1)))  # (draws * B, C, H, W), draw-major as eps
        bu = model.bottom_up(xr, eps)
        full = model.top_down(bu, eps, 0, 1.0, x=xr)
        split = lambda t: t.reshape(draws, x.shape[0], *t.shape[1:]).sum(dim=0)  # noqa: E731
        self.l1, self.kl, self.n = self.l1 + split(full.log_w), self.kl + split(full.kl), self.n + draws
        for k in self.ks:
            lw = full.log_w if k == 0 else model.top_down(bu, eps, k, 1.0, x=xr).log_w
            self.lgk[k] = self.lgk[k] + split(lw)
        return full.log_w


@torch.no_grad()
def evaluate_request(model: Biva, x: torch.Tensor, stream: NoiseStream, req: ScoreRequest, chunk: int = 64) -> Bounds:
    """The PyTorch reference of a biva_score request `req`: its estimator's L_1, L^{>k} and KL, and L_K.

    Draws come from `stream` as (R, B, noise_dim) in order, in chunks of at most `chunk` draws, R the request's
    random draws (the estimator's S, and K for L_K), so memory is O(chunk * B) whatever K is; L_K runs through a
    running log-sum-exp. "mode" takes one more pass at zero noise, outside the stream.
    """
    B, N = x.shape[0], model.noise_dim
    sums = _Sums(req.ks)
    if req.estimator == "mode":
        sums.add(model, x, torch.zeros(B, N, dtype=x.dtype, device=x.device), 1)
    lse = torch.full((B,), -math.inf, dtype=x.dtype, device=x.device)
    done = 0
    while done < req.random_draws:
        c = min(chunk, req.random_draws - done)
        eps = stream.take((c, B, N), x.device, x.dtype).reshape(c * B, -1)  # (c*B, N), draw-major
        n_stat = min(max(req.stat_draws - done, 0), c)  # the estimator's draws in this chunk
        parts = [sums.add(model, x, eps[:n_stat * B], n_stat)] if n_stat else []
        if c > n_stat:
            xr = x.repeat(c - n_stat, *([1] * (x.dim() - 1)))
            parts.append(model(xr, eps[n_stat * B:]).log_w)
        n_iw = min(max(req.iw - done, 0), c) if req.want_iw else 0
        if n_iw:
            lse = torch.logaddexp(lse, torch.logsumexp(torch.cat(parts).reshape(c, B)[:n_iw], dim=0))
        done += c
    n = max(sums.n, 1)
    return Bounds(elbo=sums.l1 / n, iw=lse - math.log(req.iw) if req.want_iw else None,
                  l_gt_k={k: v / n for k, v in sums.lgk.items()}, kl=sums.kl / n)


def evaluate_bounds(model: Biva, x: torch.Tensor, stream: NoiseStream, iw_samples: int = 1,
                    ks: tuple[int, ...] = (), chunk: int = 64) -> Bounds:
    """The bounds on log p(x): L_1 and L^{>k} of one draw (the "sample" estimator) and L_K of `iw_samples`
    draws, the first of which is L_1's (evaluate_request with a "sample" request)."""
    return evaluate_request(model, x, stream, ScoreRequest("sample", 1, iw_samples, tuple(ks)), chunk)


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
