"""Scoring a biva_score request: the estimators' draws, L_K's importance samples, the scorer calls of each block
and their reduction (`run_score`), run once by the served front models, the export's route validation, the client's
in-process paths and the bench. Copied beside every python-backend model.py. Numpy and the contract only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .contract import DEFAULT_ESTIMATOR, ESTIMATORS, T, ModelMeta, RequestError, check_iw, check_ks, check_samples, \
    draw_noise

# An estimator says how L_1 and each L^{>k} (eq. 2) of an image are estimated from draws of its latents:
#   sample  one random draw (the first), as the bounds' definitions: its L_1 and L^{>k} are bounds on log p(x)
#   mean    the mean of S random draws' log weights (common noise for L_1 and every L^{>k}, each draw with its
#           own L^{>k}): still bounds on log p(x) (a mean of lower bounds), with S times less variance
#   mode    every latent at its distribution's mean (all noise zero: posterior means above k, conditional-prior
#           means at and below k): deterministic, and a score, not a bound on log p(x)
# L_K is always the importance-weighted bound over K random draws (the first of them shared with the estimator).

# Rows (images x draws) per scorer call. Small calls keep the runtime's activations in the caches: default28's
# rows ran 1.4x faster per row in calls of 32 rows than in one call of 1000 (one thread, a Xeon with 2 MB of L2
# per core; 16 to 64 rows within 10% of the best). Each call runs the stages that see x alone once per image and
# costs a fixed few ms of per-node overhead, so much smaller calls lose more than the caches give.
IW_CALL_ROWS = 32
# Rows per graph call of the other front models (sample, regenerate, encode): small calls for the same reason, and
# each graph instance's memory arena grows only to what its largest call needs (routing.ARENA_KEEP_ROWS)
CALL_ROWS = 64
HEAVY_ROWS = 4096  # a score request costing more rows is heavy: only heavy_slots() of them run at once


def heavy_slots(front_instances: int, graph_instances: int) -> int:
    """Heavy requests a scoring model runs at once: fewer than its own instances and than the scorer's instances
    (a heavy request's calls fill every scorer instance), so small requests keep an instance of each; at least one."""
    return max(1, min(front_instances, graph_instances) - 1)


@dataclass(frozen=True)
class ScoreRequest:
    """What one biva_score request asks for, checked (`check`)."""

    estimator: str = DEFAULT_ESTIMATOR  # one of ESTIMATORS
    samples: int = 1  # S, the draws "mean" averages (1 for "sample" and "mode")
    iw: int = 1  # K, the importance samples of L_K
    ks: tuple[int, ...] = ()  # the k of each L^{>k}
    want_iw: bool = True  # compute L_K (False: only the estimator's draws are made)

    @property
    def stat_draws(self) -> int:
        """Random draws that get L^{>k} and enter the estimator's mean (0 for mode)."""
        return 0 if self.estimator == "mode" else self.samples

    @property
    def random_draws(self) -> int:
        """Random draws per image taken from the request's noise stream, in order."""
        return max(self.stat_draws, self.iw if self.want_iw else 0)

    def rows(self, batch: int) -> int:
        """The request's cost in scorer rows: one per draw and image, and one more per k for the draws with ks."""
        with_ks = self.stat_draws + (self.estimator == "mode")
        return batch * (self.random_draws + (self.estimator == "mode") + with_ks * len(self.ks))

    def check(self, batch: int, meta: ModelMeta) -> ScoreRequest:
        caps = meta.caps
        if self.estimator not in ESTIMATORS:
            raise RequestError(f"estimator: got {self.estimator!r}, expected one of {', '.join(ESTIMATORS)}")
        if self.estimator == "mean":
            check_samples(self.samples, caps)
        elif self.samples != 1:
            raise RequestError(f"samples: got {self.samples}; estimator {self.estimator!r} takes one draw "
                               "(send samples = 1 or none, or use estimator 'mean' for the mean of S draws)")
        check_iw(self.iw, caps)
        if self.ks:
            check_ks(np.asarray(self.ks), meta.n_layers)
        rows = self.rows(batch)
        if rows > caps.max_rows:
            per = max(1, self.rows(1))
            raise RequestError(f"{T.iw}: this request costs {rows} scorer rows ({batch} images x {per} rows each: "
                               f"draws, and one more per k where L^{{>k}} is computed), over the cap max_rows = "
                               f"{caps.max_rows}; send at most {max(1, caps.max_rows // per)} images per request")
        return self


@dataclass(frozen=True)
class Block:
    """Draws of every image taken (and reduced) together: `start` .. `start + count` of the stream, or the one
    zero-noise pass of the mode estimator (start -1)."""

    start: int
    count: int
    with_ks: bool

    @property
    def mode(self) -> bool:
        return self.start < 0


def score_blocks(req: ScoreRequest, batch: int, graph_rows: int) -> list[Block]:
    """The request's blocks in stream order: the mode pass, then the draws with ks, then the rest of L_K's; each
    block holds at most max(1, graph_rows // batch) draws, so memory is one block's noise whatever K is."""
    per = max(1, graph_rows // batch)
    blocks = [Block(-1, 1, True)] if req.estimator == "mode" else []
    for lo, hi, with_ks in ((0, req.stat_draws, True), (req.stat_draws, req.random_draws, False)):
        blocks += [Block(s, min(per, hi - s), with_ks) for s in range(lo, hi, per)]
    return blocks


def iw_calls(draws: int, batch: int, rows: int = IW_CALL_ROWS) -> list[tuple[slice, slice]]:
    """(images, draws) slices of the scorer calls that cover `draws` draws of `batch` images with at most `rows`
    rows each: min(draws, rows) draws of as many images as fit (at least one)."""
    s = max(1, min(draws, rows))
    b = max(1, rows // s)
    return [(slice(i, min(i + b, batch)), slice(j, min(j + s, draws)))
            for j in range(0, draws, s) for i in range(0, batch, b)]


class LogMeanExp:
    """log (1/K) sum_k exp(a_k) per image, accumulated over blocks of rows (c, B): L_K from log weights.

    float64, with a running log-sum-exp, so memory is one block whatever K is (biva_core.objectives'
    evaluate_request in numpy)."""

    def __init__(self, batch: int):
        self.lse = np.full(batch, -np.inf)
        self.count = 0

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float64)  # (c, B)
        m = block.max(axis=0)
        self.lse = np.logaddexp(self.lse, m + np.log(np.exp(block - m).sum(axis=0)))
        self.count += block.shape[0]

    def value(self) -> np.ndarray:
        return self.lse - math.log(self.count)


class ScoreSums:
    """A request's running sums: the estimator's L_1, L^{>k} and KL (means over its draws, float64), and L_K."""

    def __init__(self, req: ScoreRequest, batch: int, groups: int):
        self.req, J = req, len(req.ks)
        self.l1, self.lgk, self.kl = np.zeros(batch), np.zeros((batch, J)), np.zeros((batch, groups))
        self.n = 0
        self.lme = LogMeanExp(batch)

    def add(self, block: Block, log_w: np.ndarray, log_w_gt_k: np.ndarray, kl: np.ndarray) -> None:
        """One block's outputs for every image: log_w (B, c), log_w_gt_k (B, c, J) (with ks), kl (B, c, G)."""
        if block.with_ks:  # the mode pass, or random draws of the estimator's mean
            self.l1 += log_w.sum(axis=1)
            self.lgk += log_w_gt_k.sum(axis=1)
            self.kl += kl.sum(axis=1)
            self.n += log_w.shape[1]
        if not block.mode and self.req.want_iw and block.start < self.req.iw:  # L_K's first K draws
            self.lme.add(log_w[:, :self.req.iw - block.start].T)

    def result(self) -> dict[str, np.ndarray]:
        n = max(self.n, 1)
        out = {T.elbo: self.l1 / n, T.l_gt_k: self.lgk / n, T.kl: self.kl / n}
        if self.req.want_iw:
            out[T.iw_bound] = self.lme.value()
        return {k: v.astype(np.float32) for k, v in out.items()}


ScorerFeeds = dict  # {T.images: (b, C, H, W), T.noise: (b, s, N), T.k: (b, J)}
ExecCalls = Callable[[list[ScorerFeeds], bool], list[tuple[np.ndarray, ...]]]  # (feeds, with_ks) -> outputs


def score_plan(req: ScoreRequest, batch: int, graph_rows: int) -> list[tuple[Block, list[tuple[slice, slice]]]]:
    """Every block of the request and its scorer calls ((images, draws within the block) slices), in order: what
    run_score runs and the bench counts."""
    call_rows = min(IW_CALL_ROWS, graph_rows)
    return [(b, iw_calls(b.count, batch, call_rows)) for b in score_blocks(req, batch, graph_rows)]


def run_score(req: ScoreRequest, x: np.ndarray, rng: np.random.Generator, noise_dim: int, graph_rows: int,
              groups: int, exec_calls: ExecCalls, check: Callable[[], None] = lambda: None) -> dict[str, np.ndarray]:
    """One biva_score request on the scorer: the estimator's L_1, L^{>k} and KL per image and, if asked, L_K.

    Random draws come from `rng` in stream order ((K, B, N) in blocks); every block's scorer calls go through
    `exec_calls(feeds, with_ks)` -> [(log_w, log_w_gt_k, kl)] (log_w alone for calls without ks), so the front
    models (BLS), the export's validation and the bench (in process) run the same plan. `check()` runs before
    every block: it raises to stop the request (a cancelled request, a shutting-down server)."""
    B = x.shape[0]
    sums, ks = ScoreSums(req, B, groups), np.asarray(req.ks, np.int64)
    for block, plan in score_plan(req, B, graph_rows):
        check()
        c = block.count
        eps = np.zeros((c, B, noise_dim), np.float32) if block.mode else draw_noise(rng, (c, B, noise_dim))
        noise = eps.transpose(1, 0, 2)  # (B, c, N): an image's draws along the scorer's sample axis
        feeds = [{T.images: x[imgs], T.noise: noise[imgs, drw],
                  T.k: np.tile(ks, (imgs.stop - imgs.start, 1)) if block.with_ks
                  else np.zeros((imgs.stop - imgs.start, 0), np.int64)} for imgs, drw in plan]
        log_w, lgk, kl = np.empty((B, c)), np.empty((B, c, len(ks))), np.empty((B, c, groups))
        for (imgs, drw), outs in zip(plan, exec_calls(feeds, block.with_ks)):
            log_w[imgs, drw] = outs[0]
            if block.with_ks:
                lgk[imgs, drw], kl[imgs, drw] = outs[1], outs[2]
        sums.add(block, log_w, lgk, kl)
    return sums.result()
