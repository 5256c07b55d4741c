"""BIVA (Maaloe et al., 2019), Appendix B, with the LVAE / LVAE+ ablations of Table 1.

Data flow of one pass, a deterministic function of (x, noise):

    bottom_up(x, eps_bu):  x -> g_1 -> h_1 -> z_1^BU -> <z_1^BU; h_1> -> g_2 -> ... -> h_L -> q(z_L | x, z_<L^BU)
    top_down(...):         z_L -> f_L -> d_{L-1} -> p(z_{L-1} | z_>L-1), q(z_{L-1}^TD | <h_{L-1}; d_{L-1}>)
                           -> z_{L-1} = (z^BU, z^TD) -> f_{L-1} -> ... -> d_0 -> p(x | z)

Latent layout (the "flat layout" used at every tensor boundary): a (B, D) tensor holding, for
i = 1 .. L-1, z_i^BU (BIVA only) then z_i^TD, then z_L; each group flattened row-major
(dense: (z_dim,), conv: (z_dim, H_i, W_i)). Noise is (B, D + D_bu): the first D entries drive the
top-down pass in the same layout (posterior draws of z^TD and z_L, and any prior draw), the last D_bu
drive the bottom-up draws of z_i^BU.

`k` (0..L) takes the bottom k stochastic layers from the conditional prior p(z_<=k | z_>k) instead of
the posterior, which is what L^{>k} (eq. 2) and the Figure 12 regenerations need. With k > 0, the
z_i^BU for i <= k are still drawn from q in the bottom-up pass, because q(z_>k | x) is conditioned on
them; they are then replaced by a fresh prior draw (from the top-down noise) in the generative pass, and
only q(z_>k | x, z_<=k^BU) enters the ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BivaConfig
from .distributions import Bernoulli, DiagGaussian, DiscretizedLogisticMixture
from .layers import Block, GaussianHead, LatentEmbed, ResLayer


@dataclass(frozen=True)
class Group:
    """One latent variable in the flat layout."""

    name: str  # "bu", "td" or "top"
    level: int  # stochastic layer i, 1..L
    size: int  # flat size
    offset: int  # start in the flat layout


class BottomUp(NamedTuple):
    h: list[torch.Tensor]  # h_{i,M} for i = 1..L (the tilde-d of the paper)
    q_bu: list[DiagGaussian | None]  # q(z_i^BU | .) for i = 1..L-1 (None without BU latents)
    z_bu: list[torch.Tensor | None]  # their draws
    q_top: DiagGaussian  # q(z_L | x, z_<L^BU)
    h_td: list[torch.Tensor] | None = None  # the second inference path's h_i^TD, i = 1..L (cfg.q_td_path only)

    def map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "BottomUp":
        """The same pass with `f` applied to every tensor (e.g. taking some rows)."""
        q = lambda d: d.map(f) if d is not None else None  # noqa: E731
        return BottomUp([f(h) for h in self.h], [q(d) for d in self.q_bu],
                        [f(z) if z is not None else None for z in self.z_bu], self.q_top.map(f),
                        [f(h) for h in self.h_td] if self.h_td is not None else None)


class Pass(NamedTuple):
    z: torch.Tensor  # (B, D) the latents used, flat layout
    q_mu: torch.Tensor  # (B, D) posterior means (0 where no posterior was computed)
    q_log_std: torch.Tensor  # (B, D)
    log_ratio: torch.Tensor  # (B, G) log p(z_g | z_>g) - log q(z_g | .), zero for groups taken from the prior
    kl: torch.Tensor  # (B, G) analytic KL(q || p) per group (posterior groups only)
    log_px: torch.Tensor  # (B,) log p(x | z), zeros when no x was given (float64 for the logistic mixture)
    x_mean: torch.Tensor  # (B, C, H, W) mean of p(x | z)

    @property
    def log_w(self) -> torch.Tensor:
        """Per-sample log importance weight: log p(x|z) + sum over posterior groups of log p - log q,
        in the latents' dtype (a float64 log p(x|z) is rounded once, here)."""
        log_w = self.log_px + self.log_ratio.sum(dim=1)
        return log_w if log_w.dtype == self.log_ratio.dtype else log_w.to(self.log_ratio.dtype)


def repeat_rows(t: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """Each row repeated n times, in place: (B, ...) -> (B * n, ...), rows b*n .. b*n+n-1 are row b."""
    return t.unsqueeze(1).expand(t.shape[0], n, *t.shape[1:]).reshape(-1, *t.shape[1:])


def _prior_mask(level: int, k: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    """1.0 where stochastic layer `level` is drawn from the prior (level <= k), else 0.0.

    k is a Python int (one value for the batch) or a tensor: 0-d, or one k per row ((B,) or (B, 1)),
    in which case the mask is (B, 1) or 0-d and broadcasts over the latent dimension."""
    if isinstance(k, torch.Tensor):
        m = (k >= level).to(like.dtype)
        return m.reshape(-1, 1) if m.dim() > 0 else m
    return 1.0 if level <= k else 0.0


class Biva(nn.Module):
    def __init__(self, cfg: BivaConfig):
        super().__init__()
        self.cfg = cfg
        self.groups = self._layout()
        self._order = self._td_order()  # plain ints, computed once: torch.compile cannot trace the Group lookups
        self.latent_dim = sum(g.size for g in self.groups)
        self.bu_noise_dim = sum(g.size for g in self.groups if g.name == "bu")
        self.noise_dim = self.latent_dim + self.bu_noise_dim

        self._build_bottom_up()  # registration order = parameter order (the optimiser state depends on it)
        self._build_top_down()

    def _build_bottom_up(self) -> None:
        """Bottom-up path: blocks g_1..g_L, q heads for z_i^BU (i < L) and z_L."""
        cfg = self.cfg
        L, stages, res = cfg.n_layers, cfg.stages, cfg.resolutions()
        x_ch, ch, bn = cfg.image_shape[0], [s.channels for s in stages], cfg.dense_bottleneck
        self.bu_embed = nn.ModuleList()
        self.bu_blocks = nn.ModuleList()
        for i, s in enumerate(stages, 1):
            in_ch = x_ch
            if i > 1:
                in_ch = ch[i - 2]
                if cfg.bu_latents:
                    p = stages[i - 2]
                    self.bu_embed.append(LatentEmbed(p.z_dim, 1, p.dense, res[i - 1], ch[i - 2], bn))
                    in_ch += self.bu_embed[-1].out_ch
            skip_ch = ch[i - 2] if (cfg.skip and i > 1) else 0
            self.bu_blocks.append(Block(in_ch, s.channels, s.kernel, s.stride, False, skip_ch,
                                        [s.stride] * cfg.m_layers, cfg.dropout_inf))
        self.q_bu_heads = nn.ModuleList(
            GaussianHead(ch[i - 1], res[i], stages[i - 1].z_dim, stages[i - 1].dense, 1, cfg.min_std, bn,
                         stages[i - 1].latent_kernel)
            for i in range(1, L) if cfg.bu_latents
        )
        top = stages[-1]
        self.q_top_head = GaussianHead(ch[-1], res[L], top.z_dim, top.dense, 1, cfg.min_std, bn, top.latent_kernel)
        if cfg.q_td_path:
            self._build_q_td_path()

    def _build_top_down(self) -> None:
        """Top-down path, shared by the generative and the inference model: td_blocks[s-1] maps z_s (and the
        skips d_{s,j}) to d_{s-1}; td_blocks[0] produces d_0 for p(x | z); prior and TD posterior heads."""
        cfg = self.cfg
        L, stages, res = cfg.n_layers, cfg.stages, cfg.resolutions()
        x_ch, ch, bn = cfg.image_shape[0], [s.channels for s in stages], cfg.dense_bottleneck
        self.td_embed = nn.ModuleList()
        self.td_blocks = nn.ModuleList()
        for s_idx, s in enumerate(stages, 1):
            n_groups = self._n_groups(s_idx)
            self.td_embed.append(LatentEmbed(s.z_dim, n_groups, s.dense, res[s_idx], s.channels, bn))
            out_ch = ch[max(s_idx - 1, 1) - 1]
            skip_ch = s.channels if (cfg.skip and s_idx < L) else 0
            # the skips come from block s+1, whose inner layers run at R_{s+1} and whose last layer at R_s
            above = stages[s_idx].stride if s_idx < L else 1
            ratios = [above] * (cfg.m_layers - 1) + [s.stride]
            self.td_blocks.append(Block(self.td_embed[-1].out_ch, out_ch, s.kernel, s.stride, True, skip_ch,
                                        ratios, cfg.dropout_gen))
        self.p_heads = nn.ModuleList(
            GaussianHead(ch[i - 1], res[i], stages[i - 1].z_dim, stages[i - 1].dense, self._n_groups(i),
                         cfg.min_std, bn, stages[i - 1].latent_kernel)
            for i in range(1, L)
        )
        q_td_in = 1 if cfg.q_td_path else 2  # the merged h_i^TD, or the concatenation <h_i; d_i> (eq. 10)
        self.q_td_heads = nn.ModuleList(
            GaussianHead(q_td_in * ch[i - 1], res[i], stages[i - 1].z_dim, stages[i - 1].dense, 1, cfg.min_std, bn,
                         stages[i - 1].latent_kernel)
            for i in range(1, L)
        )
        lik = Bernoulli if cfg.likelihood == "bernoulli" else DiscretizedLogisticMixture
        self.out_head = nn.Conv2d(ch[0], lik.n_params(x_ch, cfg.n_mixtures), 3, padding=1)
        self.out_head = torch.nn.utils.parametrizations.weight_norm(self.out_head)

    def _build_q_td_path(self) -> None:
        """The authors' second deterministic inference path (biva-pytorch's `q_td_convs`, the TF code's
        `deterministic_top_down`): stage i runs M gated layers from h_{i-1}^TD (x for i = 1), each also fed
        the BU path's h_i; a gated merge layer then combines h_i^TD with d_i before q(z_i^TD) and with h_L
        before q(z_L). Strides as the BU path's (first layer), so every skip here is at its own resolution."""
        cfg, ch = self.cfg, [s.channels for s in self.cfg.stages]
        self.q_td_blocks = nn.ModuleList(
            Block(cfg.image_shape[0] if i == 1 else ch[i - 2], s.channels, s.kernel, s.stride, False,
                  s.channels, [1] * cfg.m_layers, cfg.dropout_inf)
            for i, s in enumerate(cfg.stages, 1)
        )
        # merges i = 1..L-1 take d_i (generative dropout, as the authors' merge); merge L takes h_L (inference)
        self.q_merges = nn.ModuleList(
            ResLayer(c, c, 3, 1, False, c, 1, cfg.dropout_inf if i == cfg.n_layers else cfg.dropout_gen)
            for i, c in enumerate(ch, 1)
        )

    # ---- layout ---------------------------------------------------------------------------------
    def _n_groups(self, level: int) -> int:
        return 2 if (self.cfg.bu_latents and level < self.cfg.n_layers) else 1

    def _layout(self) -> list[Group]:
        cfg, res = self.cfg, self.cfg.resolutions()
        groups, off = [], 0
        for i, s in enumerate(cfg.stages, 1):
            size = s.z_dim if s.dense else s.z_dim * res[i][0] * res[i][1]
            names = ["top"] if i == cfg.n_layers else (["bu", "td"] if cfg.bu_latents else ["td"])
            for name in names:
                groups.append(Group(name, i, size, off))
                off += size
        return groups

    def _slice(self, t: torch.Tensor, g: Group) -> torch.Tensor:
        return t[:, g.offset:g.offset + g.size]

    def _bu_noise(self, eps: torch.Tensor, level: int) -> torch.Tensor:
        off = self.latent_dim
        for g in self.groups:
            if g.name == "bu":
                if g.level == level:
                    return eps[:, off:off + g.size]
                off += g.size
        raise KeyError(level)

    # ---- passes ---------------------------------------------------------------------------------
    def bottom_up(self, x: torch.Tensor, eps: torch.Tensor) -> BottomUp:
        """BU inference path (eqs. 7-9). x in [0, 1], (B, C, H, W); eps (B * S, noise_dim): S >= 1 importance
        samples per image, image-major (rows b*S .. b*S+S-1 draw for image b). The stages that see x alone, up
        to the first stochastic draw (g_1 and q(z_1^BU | x) in BIVA; the whole path without BU latents), run
        once per image; their outputs are repeated for each sample, and the pass is returned with B * S rows."""
        L, cfg = self.cfg.n_layers, self.cfg
        n_x = 1 if cfg.bu_latents else L  # stages before the first z^BU draw
        x = x * 2.0 - 1.0
        hs, q_bu, skips = [], [], None
        for i in range(1, n_x + 1):  # once per image
            skips, q = self._bu_stage(i, x if i == 1 else hs[-1], skips)
            hs.append(skips[-1])
            q_bu.append(q)
        h_td = self._q_td_stages(x, hs, [], 1, n_x) if cfg.q_td_path else None

        S = eps.shape[0] // x.shape[0]
        hs, skips = [repeat_rows(h, S) for h in hs[:-1]], [repeat_rows(d, S) for d in skips]
        hs.append(skips[-1])
        q_bu = [q.map(lambda t: repeat_rows(t, S)) if q is not None else None for q in q_bu]
        z_bu = [q.sample(self._bu_noise(eps, i)) if q is not None else None for i, q in enumerate(q_bu, 1)]
        for i in range(n_x + 1, L + 1):  # once per sample (BIVA only: n_x = L without BU latents)
            skips, q = self._bu_stage(i, torch.cat([hs[-1], self.bu_embed[i - 2](z_bu[-1])], dim=1), skips)
            hs.append(skips[-1])  # the cat above: (B, C + C_z, H, W)
            q_bu.append(q)
            z_bu.append(q.sample(self._bu_noise(eps, i)) if q is not None else None)
        if not cfg.q_td_path:
            return BottomUp(hs, q_bu[:L - 1], z_bu[:L - 1], self.q_top_head(hs[-1])[0])
        h_td = self._q_td_stages(x, hs, [repeat_rows(h, S) for h in h_td], n_x + 1, L)
        q_top = self.q_top_head(self.q_merges[L - 1](h_td[-1], hs[-1]))[0]
        return BottomUp(hs, q_bu[:L - 1], z_bu[:L - 1], q_top, h_td)

    def _bu_stage(self, i: int, inp: torch.Tensor, skips: list[torch.Tensor] | None
                  ) -> tuple[list[torch.Tensor], DiagGaussian | None]:
        """Block g_i's outputs h_{i,1..M} (the next block's skips) and q(z_i^BU | .) where layer i has one."""
        outs = self.bu_blocks[i - 1](inp, skips if self.cfg.skip else None)
        q = self.q_bu_heads[i - 1](outs[-1])[0] if (i < self.cfg.n_layers and self.cfg.bu_latents) else None
        return outs, q

    def _q_td_stages(self, x: torch.Tensor, hs: list[torch.Tensor], h_td: list[torch.Tensor], first: int,
                     last: int) -> list[torch.Tensor]:
        """The second inference path's stages first..last (cfg.q_td_path), appended to h_td (stages before
        `first`); stage i reads h_{i-1}^TD (x for i = 1) and the BU path's h_i."""
        h_td = list(h_td)
        for i in range(first, last + 1):
            h_td.append(self.q_td_blocks[i - 1](h_td[-1] if i > 1 else x, [hs[i - 1]] * self.cfg.m_layers)[-1])
        return h_td

    def top_down(self, bu: BottomUp | None, eps: torch.Tensor, k: int | torch.Tensor = 0,
                 temperature: float | torch.Tensor = 1.0, z_given: torch.Tensor | None = None,
                 x: torch.Tensor | None = None) -> Pass:
        """TD path (eqs. 4-6, 10). Layers <= k come from the prior; the others from the posterior
        (bu given) or from z_given (flat layout, for regeneration). eps: (B, >= D)."""
        L = self.cfg.n_layers
        B = eps.shape[0]
        zs, mus, log_stds, ratios, kls = [], [], [], [], []
        by_level: dict[int, list[Group]] = {}
        for g in self.groups:
            by_level.setdefault(g.level, []).append(g)

        d_skips, z_above = None, None
        for level in range(L, 0, -1):
            groups = by_level[level]
            priors, posts, d_skips = self._level_dists(level, groups, bu, z_above, d_skips, eps)
            m = _prior_mask(level, k, eps)
            level_z = []
            for g, p, q in zip(groups, priors, posts):
                e = self._slice(eps, g)
                z_prior = p.sample(e, temperature)
                if q is not None:
                    z_post = bu.z_bu[level - 1] if g.name == "bu" else q.sample(e)
                    ratio = (p.log_prob(z_post) - q.log_prob(z_post)).sum(dim=1)
                    kls.append(q.kl(p).sum(dim=1))
                    mus.append(q.mu)
                    log_stds.append(q.log_std)
                else:
                    z_post = z_given[:, g.offset:g.offset + g.size] if z_given is not None else z_prior
                    ratio = torch.zeros(B, dtype=eps.dtype, device=eps.device)
                    kls.append(ratio)
                    mus.append(torch.zeros_like(e))
                    log_stds.append(torch.zeros_like(e))
                if isinstance(m, float):
                    z, keep = (z_prior, 0.0) if m else (z_post, 1.0)
                else:
                    z, keep = m * z_prior + (1.0 - m) * z_post, (1.0 - m).reshape(-1)
                ratios.append(ratio * keep)
                level_z.append(z)
                zs.append(z)
            z_above = torch.cat(level_z, dim=1) if len(level_z) > 1 else level_z[0]

        d0 = self.td_blocks[0](self.td_embed[0](z_above), d_skips if self.cfg.skip else None)[-1]
        lik = self._likelihood(self.out_head(F.elu(d0)))
        log_px = torch.zeros(B, dtype=eps.dtype, device=eps.device) if x is None else self._log_px(lik, x)
        order = self._order
        return Pass(
            z=torch.cat([zs[j] for j in order], dim=1),
            q_mu=torch.cat([mus[j] for j in order], dim=1),
            q_log_std=torch.cat([log_stds[j] for j in order], dim=1),
            log_ratio=torch.stack([ratios[j] for j in order], dim=1),
            kl=torch.stack([kls[j] for j in order], dim=1),
            log_px=log_px,
            x_mean=lik.mean(),
        )

    def _level_dists(self, level: int, groups: list[Group], bu: BottomUp | None, z_above: torch.Tensor | None,
                     d_skips: list[torch.Tensor] | None, eps: torch.Tensor) -> tuple[list, list, list | None]:
        """Layer `level`'s priors and posteriors (None without a bottom-up pass), one per group, and the TD
        block's outputs d_{level,1..M} (the next block's skips; unchanged at the top, which has no block)."""
        if level == self.cfg.n_layers:
            return [DiagGaussian.standard(self._slice(eps, groups[0]))], [bu.q_top if bu is not None else None], d_skips
        d_outs = self.td_blocks[level](self.td_embed[level](z_above), d_skips if self.cfg.skip else None)
        d = d_outs[-1]
        posts = []
        for g in groups:
            if bu is None:
                posts.append(None)
            elif g.name == "bu":
                posts.append(bu.q_bu[level - 1])
            else:
                posts.append(self.q_td_heads[level - 1](self._q_td_input(bu, level, d))[0])
        return self.p_heads[level - 1](d), posts, d_outs

    def _log_px(self, lik, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per image, (B,)."""
        if self.cfg.likelihood == "bernoulli":
            return lik.log_prob(x).flatten(1).sum(dim=1)
        # H x W pixel terms of several nats each: summed in float32, the total (thousands of nats) is off by
        # more than the export's 1e-3-nat tolerance, differently in each runtime; kept in float64 until log_w
        # rounds it once
        return lik.log_prob(x).flatten(1).to(torch.float64).sum(dim=1)

    def _q_td_input(self, bu: BottomUp, level: int, d: torch.Tensor) -> torch.Tensor:
        """What q(z_i^TD) reads: <h_i; d_i> (eq. 10), or the gated merge of h_i^TD with d_i (cfg.q_td_path)."""
        if bu.h_td is not None:
            return self.q_merges[level - 1](bu.h_td[level - 1], d)
        return torch.cat([bu.h[level - 1], d], dim=1)  # (B, 2C, H, W)

    def _td_order(self) -> list[int]:
        """Permutation from top-down visiting order to the flat layout's group order."""
        visit = [g for level in range(self.cfg.n_layers, 0, -1) for g in self.groups if g.level == level]
        return [visit.index(g) for g in self.groups]

    def _likelihood(self, params: torch.Tensor):
        if self.cfg.likelihood == "bernoulli":
            return Bernoulli(params)
        return DiscretizedLogisticMixture(params, self.cfg.image_shape[0], self.cfg.n_mixtures)

    # ---- conveniences ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, eps: torch.Tensor, k: int | torch.Tensor = 0) -> Pass:
        """Inference + generative pass: x (B, C, H, W) in [0, 1], eps (B, noise_dim)."""
        return self.top_down(self.bottom_up(x, eps), eps, k, 1.0, x=x)

    def sample(self, eps: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> Pass:
        """Unconditional samples from the prior: eps (B, >= D)."""
        return self.top_down(None, eps, self.cfg.n_layers, temperature)

    def regenerate(self, z: torch.Tensor, k: int | torch.Tensor, eps: torch.Tensor,
                   temperature: float | torch.Tensor = 1.0) -> Pass:
        """Keep z_>k from `z` (flat layout), redraw z_<=k from the conditional prior (Figure 12)."""
        return self.top_down(None, eps, k, temperature, z_given=z)

    def group_names(self) -> list[str]:
        return [f"z{g.level}_{g.name}" if g.name != "top" else f"z{g.level}" for g in self.groups]
