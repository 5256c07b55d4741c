"""Out-of-distribution scores, detection metrics and thresholds.

Scores are oriented so that larger = more anomalous (Havtorn et al., 2021):

    L1       -L_1                       the ELBO, negated
    LK       -L_K                       with iw = K > 1 (importance weighted bound, negated)
    L>k      -L^{>k}                    eq. (2): layers <= k from the prior, negated
    LLR>k    L_1 - L^{>k}               the likelihood ratio LLR^{>k}

Metrics treat the in-distribution set as the negative class (label 0) and the OOD set as the positive
class (label 1): AUROC, AUPRC (average precision) and the false-positive rate (in-distribution inputs
flagged) at the threshold that detects 95% of the OOD inputs.
"""
from __future__ import annotations

import re

import numpy as np

from .api import InputError
from .tasks import ScoreTable

FPR_AT_TPR = 0.95


def score_names(ks: tuple[int, ...], iw: int) -> list[str]:
    names = ["L1"] + (["LK"] if iw > 1 else [])
    return names + [f"L>{k}" for k in ks] + [f"LLR>{k}" for k in ks]


def canonical_score(name: str) -> str:
    """Accept 'LLR>2', 'llr_gt2', 'LLRgt2', 'l>1', 'l1', 'lk'; return the canonical name."""
    m = re.fullmatch(r"\s*(llr|l)\s*(?:>|_?gt_?)\s*(\d+)\s*", name, re.IGNORECASE)
    if m:
        return f"{m.group(1).upper()}>{int(m.group(2))}"
    if name.strip().upper() in ("L1", "LK"):
        return name.strip().upper()
    raise InputError(f"score: unknown name {name!r}; expected L1, LK, L>k or LLR>k (e.g. 'LLR>2', or LLR_gt2)")


def score_k(name: str) -> int | None:
    """The k of an L>k / LLR>k score, else None."""
    return int(name.split(">")[1]) if ">" in name else None


def ood_scores(table: ScoreTable) -> dict[str, np.ndarray]:
    """Every score the table supports, larger = more anomalous."""
    out = {"L1": -table.elbo.astype(np.float64)}
    if table.iw > 1:
        out["LK"] = -table.iw_bound.astype(np.float64)
    for k in table.ks:
        out[f"L>{k}"] = -table.l_gt(k).astype(np.float64)
    for k in table.ks:
        out[f"LLR>{k}"] = table.llr(k).astype(np.float64)
    return out


def _labelled(in_scores: np.ndarray, ood_scores_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(in_scores, np.float64).ravel(), np.asarray(ood_scores_, np.float64).ravel()
    if not len(a) or not len(b):
        raise InputError("OOD metrics need at least one in-distribution and one OOD score")
    return np.concatenate([np.zeros(len(a)), np.ones(len(b))]), np.concatenate([a, b])


def auroc(in_scores: np.ndarray, ood_scores_: np.ndarray) -> float:
    """P(score(OOD) > score(in)) + 0.5 P(tie)."""
    from sklearn.metrics import roc_auc_score

    y, s = _labelled(in_scores, ood_scores_)
    return float(roc_auc_score(y, s))


def auprc(in_scores: np.ndarray, ood_scores_: np.ndarray) -> float:
    """Average precision with OOD as the positive class."""
    from sklearn.metrics import average_precision_score

    y, s = _labelled(in_scores, ood_scores_)
    return float(average_precision_score(y, s))


def fpr_at_tpr(in_scores: np.ndarray, ood_scores_: np.ndarray, tpr: float = FPR_AT_TPR) -> float:
    """Fraction of in-distribution inputs flagged at the highest threshold that flags >= `tpr` of the OOD."""
    from sklearn.metrics import roc_curve

    y, s = _labelled(in_scores, ood_scores_)
    fpr, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr_curve, tpr - 1e-12, side="left")])


def ood_table(in_table: ScoreTable, ood_table_: ScoreTable) -> dict[str, dict[str, float]]:
    """{score name: {auroc, auprc, fpr95, mean_in, mean_ood}} for every score both tables support."""
    a, b = ood_scores(in_table), ood_scores(ood_table_)
    return {name: {"auroc": auroc(a[name], b[name]), "auprc": auprc(a[name], b[name]),
                   "fpr95": fpr_at_tpr(a[name], b[name]), "mean_in": float(a[name].mean()),
                   "mean_ood": float(b[name].mean())}
            for name in a if name in b}


def format_table(table: dict[str, dict[str, float]]) -> str:
    head = f"{'score':<8} {'AUROC':>7} {'AUPRC':>7} {'FPR@95%TPR':>11} {'mean in':>10} {'mean OOD':>10}"
    lines = [head, "-" * len(head)]
    for name, m in table.items():
        lines.append(f"{name:<8} {m['auroc']:>7.4f} {m['auprc']:>7.4f} {m['fpr95']:>11.4f} "
                     f"{m['mean_in']:>10.2f} {m['mean_ood']:>10.2f}")
    return "\n".join(lines)


# ---- thresholds -----------------------------------------------------------------------------------

def fit_threshold(in_scores: np.ndarray, tpr: float = FPR_AT_TPR) -> float:
    """The smallest observed score t with at least `tpr` of the in-distribution scores <= t.

    An input is flagged when its score > t, so at least a fraction `tpr` of the calibration set passes
    (`tpr` is the in-distribution acceptance rate).
    """
    if not 0.0 < tpr <= 1.0:
        raise InputError(f"tpr: expected a fraction in (0, 1], got {tpr}")
    s = np.sort(np.asarray(in_scores, np.float64))
    if not len(s):
        raise InputError("tpr: no in-distribution scores to calibrate on")
    return float(s[max(int(np.ceil(tpr * len(s) - 1e-9)), 1) - 1])  # 1e-9: 0.95 * n is not exact


def flag(scores: np.ndarray, threshold: float) -> np.ndarray:
    return np.asarray(scores, np.float64) > threshold
