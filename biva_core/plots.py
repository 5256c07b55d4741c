"""The project's figures, drawn once for biva-eval, the client and the demo: the OOD histograms and ROC curves (the
paper's Figure 4) and the labelled reconstruction grid (Figure 12). matplotlib, Agg backend, PNG files."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .stats import DETECTOR


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_unit(name: str) -> str:
    """The x-axis label of a score's histogram."""
    if name == DETECTOR:
        return "detector score (-sum of log densities)"
    return f"{name} (nats)"


def plot_ood(in_scores: dict[str, np.ndarray], ood_sets: dict[str, dict[str, np.ndarray]], path: str | Path,
             in_label: str = "in-distribution", names: list[str] | None = None) -> Path:
    """Histograms of each score (`names`, default every score all sets have), the in-distribution set against
    every OOD set (density, larger = more anomalous), then one panel of ROC curves per OOD set."""
    plt = _pyplot()
    from sklearn.metrics import roc_curve

    names = names or [n for n in in_scores if all(n in s for s in ood_sets.values())]
    panels = len(names) + len(ood_sets)
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, name in zip(flat, names):
        sets = {in_label: in_scores[name], **{label: s[name] for label, s in ood_sets.items()}}
        lo, hi = np.percentile(np.concatenate(list(sets.values())), (0.5, 99.5))  # long tails clipped
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 50)
        for label, v in sets.items():
            ax.hist(v, bins=bins, alpha=0.55, density=True, label=label)
        ax.set_title(f"{name} (larger = more anomalous)", fontsize=9)
        ax.set_xlabel(score_unit(name) + " (0.5-99.5th percentiles)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=7)
    for ax, (label, scores) in zip(flat[len(names):], ood_sets.items()):
        for name in names:
            y = np.r_[np.zeros(len(in_scores[name])), np.ones(len(scores[name]))]
            fpr, tpr, _ = roc_curve(y, np.r_[in_scores[name], scores[name]])
            ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        ax.set_xlabel("false-positive rate (in-distribution flagged)", fontsize=8)
        ax.set_ylabel(f"true-positive rate ({label} flagged)", fontsize=8)
        ax.set_title(f"ROC: {in_label} vs {label}", fontsize=9)
        ax.legend(fontsize=6)
    for ax in flat[panels:]:
        ax.axis("off")
    return _save(fig, path, plt)


def plot_grid(stack: np.ndarray, col_labels: list[str], path: str | Path, row_label: str = "input") -> Path:
    """A (R, K, C, H, W) grid of images in [0, 1], one row per input, a labelled column per k (Figure 12)."""
    plt = _pyplot()
    R, K = stack.shape[:2]
    fig, axes = plt.subplots(R, K, figsize=(0.9 * K + 0.4, 0.9 * R + 0.4), squeeze=False)
    for r in range(R):
        for c in range(K):
            img = np.clip(stack[r, c], 0.0, 1.0)
            ax = axes[r, c]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[c], fontsize=8)
        axes[r, 0].set_ylabel(f"{row_label} {r}", fontsize=7)
    return _save(fig, path, plt)


def _save(fig, path: str | Path, plt) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
