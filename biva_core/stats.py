"""Numpy statistics shared by biva-eval, the client, the served models and the bench: bits/dim, mean +- s.e. and
percentiles, the table of OOD scores, detection metrics, and the out-of-distribution detector.

Numpy only at import (scikit-learn is imported by the metrics alone, which the server never calls), so biva-export
copies this file into the model repository beside the contract, for biva_detect.

OOD scores are oriented larger = more anomalous (Havtorn et al., 2021); `SCORES` lists them and `ood_scores`
computes them from biva_score's outputs.

The detector (in the manner of DoSE, Morningstar et al. 2021) is fitted on in-distribution images only: per image
the statistics s = (L_1, the KL of every latent group, every L^{>k}, every LLR^{>k}) of one estimator, each
standardised by its mean and deviation over the fitting set, get one Gaussian kernel density p_j each (bandwidth
in standard units); an image's score is the negated sum of its log densities. The threshold is the score that
accepts the requested fraction (TPR) of the fitting set, each fitting image scored leave-one-out (its own kernel
removed), so the threshold is not fitted to the points it was measured on.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from .contract import IDENTITY
from .scoring import ScoreRequest

PERCENTILES = (50, 90, 95, 99)
FPR_AT_TPR = 0.95  # detection metrics: the false-positive rate where this fraction of the OOD set is flagged
DETECTOR = "detector"  # the score name of the fitted detector
FIT_FORMAT, FIT_VERSION = "biva-ood-fit", 1


def bits_per_dim(nats, n_dims: int):
    """-L / (C H W log 2): a log-likelihood in nats (negative) to bits per dimension (positive); numpy arrays,
    floats and torch tensors alike."""
    return -nats / (n_dims * math.log(2.0))


def mean_se(v: np.ndarray) -> dict[str, float]:
    """Mean, standard error of the mean (ddof 1) and count."""
    v = np.asarray(v, dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def percentiles(v: np.ndarray, ps: tuple[int, ...] = PERCENTILES) -> dict[str, float]:
    """{"p50": ..., "p90": ...} of `v` (empty for no values)."""
    v = np.asarray(v, dtype=np.float64)
    return {f"p{p}": float(np.percentile(v, p)) for p in ps} if v.size else {}


# ---- OOD scores -----------------------------------------------------------------------------------

# Every OOD score, in the order of tables and help texts: (name, what it is, needs a request with iw = K > 1).
# A name ending in ">k" stands for one score per k of the request. `ood_scores` computes them.
SCORES = (
    ("L1", "-L_1", False),
    ("LK", "-L_K", True),
    ("KL", "the rate: KL(q || p) summed over every latent group (Alemi et al., 2018)", False),
    ("L>k", "-L^{>k}", False),
    ("LLR>k", "L_1 - L^{>k}", False),
    ("LLRK>k", "L_K - L^{>k}", True),
    (DETECTOR, "-sum of the fitted log densities", False),
)
SCORE_NAMES = tuple(n for n, _, _ in SCORES)
_FIXED = {n.lower(): n for n, _, _ in SCORES if not n.endswith(">k")}
_PER_K = sorted((n[:-2] for n, _, _ in SCORES if n.endswith(">k")), key=len, reverse=True)  # longest first
_SCORE = re.compile(rf"\s*({'|'.join(_PER_K)})\s*(?:>|_?gt_?)\s*(\d+)\s*", re.IGNORECASE)


def canonical_score(name: str) -> str:
    """'LLR>2', 'llr_gt2', 'LLRgt2', 'l>1', 'l1', 'lk', 'detector' -> the canonical name; ValueError otherwise."""
    m = _SCORE.fullmatch(name)
    if m:
        return f"{m.group(1).upper()}>{int(m.group(2))}"
    if name.strip().lower() in _FIXED:
        return _FIXED[name.strip().lower()]
    raise ValueError(f"score: unknown name {name!r}; expected " + ", ".join(SCORE_NAMES)
                     + " (e.g. 'LLR>2', or LLR_gt2)")


def score_k(name: str) -> int | None:
    """The k of an L>k / LLR>k / LLRK>k score, else None."""
    return int(name.split(">")[1]) if ">" in name else None


def _kind(name: str) -> int:
    """The row of SCORES a canonical score name belongs to."""
    kind = name.split(">")[0] + ">k" if ">" in name else name
    return next(i for i, (n, _, _) in enumerate(SCORES) if n == kind)


def score_order(name: str) -> tuple[int, int]:
    """Sort key of canonical score names: SCORES' order, then k."""
    return _kind(name), score_k(name) or 0


def needs_iw(name: str) -> bool:
    """Whether a canonical score needs a request with iw = K > 1."""
    return SCORES[_kind(name)][2]


def score_help() -> str:
    """'L1 = -L_1, LK = -L_K (needs iw = K > 1), ...' for help texts."""
    return ", ".join(f"{n} = {what}" + (" (needs iw = K > 1)" if iw else "") for n, what, iw in SCORES)


def ood_scores(elbo: np.ndarray, kl: np.ndarray, l_gt_k: np.ndarray, ks: tuple[int, ...],
               iw_bound: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every score of SCORES that biva_score's outputs support, float64, larger = more anomalous. elbo (N,), kl
    (N, G), l_gt_k (N, len(ks)); iw_bound (N,) adds LK and LLRK>k."""
    l1 = np.asarray(elbo, np.float64)
    lgk = np.asarray(l_gt_k, np.float64).reshape(len(l1), len(ks))
    out = {"L1": -l1}
    if iw_bound is not None:
        out["LK"] = -np.asarray(iw_bound, np.float64)
    out["KL"] = np.asarray(kl, np.float64).reshape(len(l1), -1).sum(axis=1)
    out.update({f"L>{k}": -lgk[:, j] for j, k in enumerate(ks)})
    out.update({f"LLR>{k}": l1 - lgk[:, j] for j, k in enumerate(ks)})
    if iw_bound is not None:
        out.update({f"LLRK>{k}": np.asarray(iw_bound, np.float64) - lgk[:, j] for j, k in enumerate(ks)})
    return out


# ---- detection metrics (in-distribution: label 0, OOD: label 1) ------------------------------------

def _labelled(in_scores: np.ndarray, ood_scores_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(in_scores, np.float64).ravel(), np.asarray(ood_scores_, np.float64).ravel()
    if not len(a) or not len(b):
        raise ValueError("OOD metrics need at least one in-distribution and one OOD score")
    return np.concatenate([np.zeros(len(a)), np.ones(len(b))]), np.concatenate([a, b])


def auroc(in_scores: np.ndarray, ood_scores_: np.ndarray) -> float:
    """P(score(OOD) > score(in)) + 0.5 P(tie)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_labelled(in_scores, ood_scores_)))


def auprc(in_scores: np.ndarray, ood_scores_: np.ndarray) -> float:
    """Average precision with OOD as the positive class."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(*_labelled(in_scores, ood_scores_)))


def fpr_at_tpr(in_scores: np.ndarray, ood_scores_: np.ndarray, tpr: float = FPR_AT_TPR) -> float:
    """Fraction of in-distribution inputs flagged at the highest threshold that flags >= `tpr` of the OOD."""
    from sklearn.metrics import roc_curve

    fpr, tpr_curve, _ = roc_curve(*_labelled(in_scores, ood_scores_), drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr_curve, tpr - 1e-12, side="left")])


def detection_table(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{score: {auroc, auprc, fpr95, mean_in, mean_ood}} for every score both sets have (in `a` vs OOD `b`)."""
    return {name: {"auroc": auroc(a[name], b[name]), "auprc": auprc(a[name], b[name]),
                   "fpr95": fpr_at_tpr(a[name], b[name]), "mean_in": float(np.mean(a[name])),
                   "mean_ood": float(np.mean(b[name]))}
            for name in a if name in b}


def format_table(table: dict[str, dict[str, float]]) -> str:
    head = f"{'score':<9} {'AUROC':>7} {'AUPRC':>7} {'FPR@95%TPR':>11} {'mean in':>10} {'mean OOD':>10}"
    lines = [head, "-" * len(head)]
    for name, m in table.items():
        lines.append(f"{name:<9} {m['auroc']:>7.4f} {m['auprc']:>7.4f} {m['fpr95']:>11.4f} "
                     f"{m['mean_in']:>10.2f} {m['mean_ood']:>10.2f}")
    return "\n".join(lines)


def fit_threshold(in_scores: np.ndarray, tpr: float = FPR_AT_TPR) -> float:
    """The smallest observed score t with at least `tpr` of the in-distribution scores <= t.

    An input is flagged when its score > t, so at least a fraction `tpr` of the calibration set passes
    (`tpr` is the in-distribution acceptance rate).
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr: expected a fraction in (0, 1], got {tpr}")
    s = np.sort(np.asarray(in_scores, np.float64))
    if not len(s):
        raise ValueError("tpr: no in-distribution scores to calibrate on")
    return float(s[max(int(np.ceil(tpr * len(s) - 1e-9)), 1) - 1])  # 1e-9: 0.95 * n is not exact


# ---- the detector ---------------------------------------------------------------------------------

def statistic_names(groups: tuple[str, ...], ks: tuple[int, ...]) -> list[str]:
    """The detector's statistics, in order: L1, KL of every latent group, every L>k, every LLR>k."""
    return ["L1", *(f"KL:{g}" for g in groups), *(f"L>{k}" for k in ks), *(f"LLR>{k}" for k in ks)]


def statistics(elbo: np.ndarray, kl: np.ndarray, l_gt_k: np.ndarray) -> np.ndarray:
    """(N, 1 + G + 2J) float64 in `statistic_names` order, from biva_score's elbo (N,), kl (N, G), l_gt_k (N, J)."""
    l1 = np.asarray(elbo, np.float64).reshape(-1, 1)
    lgk = np.asarray(l_gt_k, np.float64).reshape(len(l1), -1)
    return np.concatenate([l1, np.asarray(kl, np.float64).reshape(len(l1), -1), lgk, l1 - lgk], axis=1)


def _kde_log_density(z: np.ndarray, points: np.ndarray, h: float, leave_out: bool = False) -> np.ndarray:
    """log of the Gaussian kernel density of `points` (n,) with bandwidth h at z (B,); leave_out: z are the
    points themselves, each scored without its own kernel."""
    n, out = len(points), np.empty(len(z))
    norm = math.log(h * math.sqrt(2.0 * math.pi))
    for s in range(0, len(z), 512):  # (512, n) at a time
        e = -0.5 * ((z[s:s + 512, None] - points[None, :]) / h) ** 2  # (b, n)
        if leave_out:
            e[np.arange(e.shape[0]), np.arange(s, s + e.shape[0])] = -np.inf
        m = e.max(axis=1, keepdims=True)
        out[s:s + 512] = m[:, 0] + np.log(np.exp(e - m).sum(axis=1)) - math.log(n - leave_out) - norm
    return out


@dataclass(frozen=True)
class Detector:
    """A fitted OOD detector: one score (a single score of `ood_scores`, or DETECTOR, the kernel densities) of one
    estimator, and its threshold. Written by `biva-client ood fit`, read by `ood check`, biva-eval and biva_detect."""

    score: str  # canonical score name, or DETECTOR
    estimator: str  # contract.ESTIMATORS
    samples: int  # the estimator's draws S
    iw: int  # K of the LK / LLRK scores (1 otherwise)
    ks: tuple[int, ...]  # the k the score needs
    threshold: float  # flagged when score > threshold
    tpr: float  # fraction of the fitting set accepted
    model: dict  # the served model it was fitted on: checkpoint_sha256, image_shape, groups, n_layers
    fitted_on: dict  # data spec, images, seed, batch size
    names: tuple[str, ...] = ()  # DETECTOR: statistic_names
    mean: tuple[float, ...] = ()  # DETECTOR: per statistic, over the fitting set
    std: tuple[float, ...] = ()
    bandwidth: float = 0.3  # DETECTOR: kernel bandwidth, in standard units
    points: tuple[tuple[float, ...], ...] = ()  # DETECTOR: standardised statistics of the fitting set (F, n), 6 digits

    def kde_scores(self, stats: np.ndarray, leave_out: bool = False) -> np.ndarray:
        """DETECTOR's score of (N, F) statistics: -sum_j log p_j(standardised s_j)."""
        z = (np.asarray(stats, np.float64) - np.asarray(self.mean)) / np.asarray(self.std)
        return -sum(_kde_log_density(z[:, j], p, self.bandwidth, leave_out) for j, p in enumerate(self._points))

    @cached_property
    def _points(self) -> np.ndarray:
        """The points as one (F, n) array, made once (from the tuples, about 1 ms a request otherwise)."""
        return np.asarray(self.points, np.float64)

    def scores(self, elbo, kl, l_gt_k, iw_bound=None) -> np.ndarray:
        """This detector's score of each image from biva_score's outputs (l_gt_k for `ks`, in order)."""
        if self.score == DETECTOR:
            return self.kde_scores(statistics(elbo, kl, l_gt_k))
        return ood_scores(elbo, kl, l_gt_k, self.ks, iw_bound)[self.score]

    def to_json(self) -> str:
        return json.dumps({"format": FIT_FORMAT, "version": FIT_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> Detector:
        """ValueError (one line) for anything but a file `ood fit` wrote."""
        d = json.loads(text)
        if not isinstance(d, dict) or d.pop("format", None) != FIT_FORMAT or d.pop("version", None) != FIT_VERSION:
            raise ValueError(f"not a {FIT_FORMAT} file of version {FIT_VERSION} (written by `biva-client ood fit`)")
        d.update(ks=tuple(d["ks"]), names=tuple(d["names"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                 points=tuple(tuple(p) for p in d["points"]), score=canonical_score(d["score"]))
        det = cls(**d)
        if det.score == DETECTOR and not (len(det.names) == len(det.mean) == len(det.std) == len(det.points) > 0):
            raise ValueError("the detector's names, mean, std and points do not match")
        return det

    def summary(self) -> dict:
        """Everything but the points (biva_detect's config parameter, the client's messages)."""
        return {k: v for k, v in asdict(self).items() if k != "points"}

    def checkpoint(self) -> str | None:
        """The SHA-256 of the checkpoint this was fitted on (ModelMeta.identity's first key)."""
        return self.model.get(IDENTITY[0])

    def request(self) -> ScoreRequest:
        """The biva_score request whose outputs this detector scores (biva_detect asks it once per request: from the
        fields, not summary(), whose deep copy of the points took 26 ms)."""
        return request_of({"estimator": self.estimator, "samples": self.samples, "iw": self.iw, "ks": self.ks})


def request_of(summary: dict) -> ScoreRequest:
    """The biva_score request of a detector's summary (Detector.summary, biva_detect's config parameter)."""
    return ScoreRequest(summary["estimator"], summary["samples"], summary["iw"], tuple(summary["ks"]),
                        want_iw=summary["iw"] > 1)


def fit_detector(base: Detector, stats: np.ndarray, bandwidth: float = 0.3) -> Detector:
    """`base` (its score DETECTOR, threshold ignored) fitted on the in-distribution statistics (N, F): the kernel
    densities, and the threshold that accepts base.tpr of the fitting set, scored leave-one-out."""
    s = np.asarray(stats, np.float64)
    if s.ndim != 2 or len(s) < 2 or s.shape[1] != len(base.names):
        raise ValueError(f"detector: expected statistics (N >= 2, {len(base.names)}), got {s.shape}")
    mean, std = s.mean(axis=0), np.maximum(s.std(axis=0), 1e-6)
    points = ((s - mean) / std).T  # (F, N)
    det = Detector(**{**asdict(base), "score": DETECTOR, "mean": tuple(map(float, mean)),
                      "std": tuple(map(float, std)), "bandwidth": float(bandwidth),
                      "points": tuple(tuple(float(f"{v:.6g}") for v in p) for p in points)})
    return Detector(**{**asdict(det), "threshold": fit_threshold(det.kde_scores(s, leave_out=True), base.tpr)})
