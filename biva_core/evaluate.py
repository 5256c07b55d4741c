"""`biva-eval`: L_1, L_K, L^{>k}, LLR^{>k} and KL per latent on a data set, in nats and bits/dim.

    biva-eval --ckpt models/default28.pt --data fashion-mnist:test --iw 1000 --k 0,1,2 --limit 500 --json
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, load_model
from .data import DATA_SPEC_HELP, load_for_model
from .model import Biva
from .noise import NoiseStream
from .objectives import bits_per_dim, evaluate_bounds


def parse_k_list(text: str, n_layers: int) -> tuple[int, ...]:
    """'0,2,4' -> (0, 2, 4); each k must lie in 0..L."""
    try:
        ks = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--k must be a comma-separated list of integers, got {text!r}") from None
    bad = [k for k in ks if not 0 <= k <= n_layers]
    if bad:
        raise ValueError(f"--k values {bad} out of range: expected 0..{n_layers} (L = {n_layers})")
    return ks


def _mean_se(v: np.ndarray) -> tuple[float, float]:
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


@torch.no_grad()
def per_image(model: Biva, images: np.ndarray, iw: int = 1, ks: tuple[int, ...] = (), batch_size: int = 100,
              seed: int = 0, progress: bool = False, first_batch: int = 0) -> dict[str, np.ndarray]:
    """Per-image bounds: {"elbo": (N,), "iw": (N,), "kl": (N, G), "q_mu_top": ..., "l_gt_k": (N,) per k}.

    Batch b draws its noise from one stream seeded with seed + first_batch + b (the client sends batch b of a
    job with seed + b, so served and PyTorch numbers agree). `first_batch` lets a run over images[s:] (s a
    multiple of batch_size) draw exactly the noise a run over all images would, so a long evaluation split
    into pieces gives the numbers of one run. Importance samples go through in chunks of at most 64 samples and 4096 rows.
    """
    per = {"elbo": [], "iw": [], "kl": [], **{f"l_gt_{k}": [] for k in ks}}
    starts = range(0, len(images), batch_size)
    for b, i in enumerate(tqdm(starts, disable=not progress, desc="eval")):
        x = torch.from_numpy(images[i:i + batch_size])
        res = evaluate_bounds(model, x, NoiseStream(seed + first_batch + b), iw, ks,
                              chunk=max(1, min(64, 4096 // len(x))))
        per["elbo"].append(res.elbo.numpy())
        per["iw"].append(res.iw.numpy())
        per["kl"].append(res.kl.numpy())
        for k in ks:
            per[f"l_gt_{k}"].append(res.l_gt_k[k].numpy())
    return {k: np.concatenate(v) for k, v in per.items()}


def summarize(model: Biva, cat: dict[str, np.ndarray], iw: int, ks: tuple[int, ...]) -> dict:
    """Means (and standard errors) of `per_image`'s output, in nats and bits/dim; KL per latent variable."""
    n_dims = int(np.prod(model.cfg.image_shape))
    elbo, elbo_se = _mean_se(cat["elbo"])
    out = {"n_images": len(cat["elbo"]), "elbo_nats": elbo, "elbo_se": elbo_se,
           "bits_per_dim": float(bits_per_dim(elbo, n_dims)),
           "kl_per_layer": dict(zip(model.group_names(), map(float, cat["kl"].mean(axis=0)))),
           "kl_total": float(cat["kl"].sum(axis=1).mean()),
           "l_gt_k": {str(k): _mean_se(cat[f"l_gt_{k}"])[0] for k in ks},
           "llr_gt_k": {str(k): float((cat["elbo"] - cat[f"l_gt_{k}"]).mean()) for k in ks}}
    if iw > 1:
        m, se = _mean_se(cat["iw"])
        out.update({"iw_samples": iw, "iw_nats": m, "iw_se": se, "iw_bits_per_dim": float(bits_per_dim(m, n_dims))})
    return out


def ood_scores(cat: dict[str, np.ndarray], ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Scores oriented larger = more anomalous (Havtorn et al., 2021): L1 = -L_1, L>k = -L^{>k} (eq. 2),
    LLR>k = L_1 - L^{>k}."""
    out = {"L1": -cat["elbo"].astype(np.float64)}
    out.update({f"L>{k}": -cat[f"l_gt_{k}"].astype(np.float64) for k in ks})
    out.update({f"LLR>{k}": (cat["elbo"] - cat[f"l_gt_{k}"]).astype(np.float64) for k in ks})
    return out


def ood_aurocs(in_cat: dict[str, np.ndarray], ood_cat: dict[str, np.ndarray], ks: tuple[int, ...]) -> dict[str, float]:
    """AUROC per score, the in-distribution set as the negative class."""
    from sklearn.metrics import roc_auc_score

    a, b = ood_scores(in_cat, ks), ood_scores(ood_cat, ks)
    y = np.r_[np.zeros(len(in_cat["elbo"])), np.ones(len(ood_cat["elbo"]))]
    return {name: float(roc_auc_score(y, np.r_[a[name], b[name]])) for name in a}


@torch.no_grad()
def active_units(model: Biva, images: np.ndarray, threshold: float = 0.01, batch_size: int = 500) -> dict[str, int]:
    """Active units per latent variable (Burda et al., 2016): Cov_x(E_q[z_u | x]) > threshold.

    Posterior means come from one bottom-up + top-down pass with zero noise, so every latent above a layer is
    its posterior mean (z^TD's q depends on the values drawn above it) and the pass is a function of x alone;
    a unit counts as active when its mean moves with the input.
    """
    means = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size])
        means.append(model(x, torch.zeros(len(x), model.noise_dim)).q_mu.numpy())
    var = np.concatenate(means).var(axis=0)  # (D,)
    return {name: int((var[g.offset:g.offset + g.size] > threshold).sum())
            for name, g in zip(model.group_names(), model.groups)}


def ood_report(model: Biva, meta: dict, in_cat: dict[str, np.ndarray], ood_specs: tuple[str, ...],
               ks: tuple[int, ...], n: int | None, batch_size: int, seed: int) -> tuple[dict, dict]:
    """Per OOD set: its summary (KL per latent included, the paper's Figure 2 idea) and AUROC per score.

    Returns (report, per-image arrays by spec) so the caller can draw the histograms."""
    report, cats = {}, {}
    for spec in ood_specs:
        cats[spec] = per_image(model, load_for_model(spec, meta, n), 1, ks, batch_size, seed)
        report[spec] = {**summarize(model, cats[spec], 1, ks), "auroc": ood_aurocs(in_cat, cats[spec], ks)}
    return report, cats


def plot_histograms(path: Path, in_name: str, in_cat: dict[str, np.ndarray], ood_cats: dict[str, dict[str, np.ndarray]],
                    ks: tuple[int, ...], best: str, n_dims: int) -> None:
    """Figure 4: histograms of -L_1 and -L^{>k} in bits/dim, and of the best score, in vs each OOD set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["L1", *[f"L>{k}" for k in ks], *([best] if best.startswith("LLR") else [])]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    to_bpd = 1.0 / (n_dims * math.log(2.0))
    for ax, name in zip(axes[0], names):
        unit = 1.0 if name.startswith("LLR") else to_bpd
        for label, cat in [(in_name, in_cat), *ood_cats.items()]:
            ax.hist(ood_scores(cat, ks)[name] * unit, bins=50, alpha=0.5, density=True, label=label)
        ax.set_title(name + (" (nats)" if name.startswith("LLR") else " (bits/dim)") + (" *" if name == best else ""))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _print_summary(res: dict, data: str, iw: int, ks: tuple[int, ...]) -> None:
    click.echo(f"{data}: {res['n_images']} images")
    click.echo(f"  L_1    {res['elbo_nats']:.2f} +- {res['elbo_se']:.2f} nats  ({res['bits_per_dim']:.4f} bits/dim)")
    if iw > 1:
        click.echo(f"  L_{iw:<4} {res['iw_nats']:.2f} +- {res['iw_se']:.2f} nats  ({res['iw_bits_per_dim']:.4f} bits/dim)")
    for k in ks:
        click.echo(f"  L^>{k}  {res['l_gt_k'][str(k)]:.2f} nats   LLR^>{k} {res['llr_gt_k'][str(k)]:.2f}")
    click.echo("  KL per latent: " + ", ".join(f"{n} {v:.2f}" for n, v in res["kl_per_layer"].items()))
    if "active_units" in res:
        click.echo("  active units: " + ", ".join(f"{n} {v}" for n, v in res["active_units"].items()))
    for spec, r in res.get("ood", {}).items():
        click.echo(f"OOD {spec}: {r['n_images']} images, L_1 {r['elbo_nats']:.2f} nats; AUROC "
                   + ", ".join(f"{n} {v:.3f}" for n, v in r["auroc"].items()))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Checkpoint (model.pt).")
@click.option("--data", required=True, help="Data spec.\n\n\b\n" + DATA_SPEC_HELP)
@click.option("--iw", default=1, show_default=True, help="Importance samples K for L_K (1..1000 and more).")
@click.option("--k", "k_list", default="", help="Comma-separated k for L^{>k} and LLR^{>k}, each in 0..L.")
@click.option("--ood", "ood_specs", multiple=True,
              help="Out-of-distribution data spec (repeatable): its bounds, KL per latent and AUROC of every score "
                   "against --data (same --limit, L_1 noise).")
@click.option("--hist", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --ood: write Figure 4's histograms (L_1, every L^{>k} and the best LLR) to this PNG.")
@click.option("--active-units", "with_au", is_flag=True, help="Count active units per latent variable on --data.")
@click.option("--limit", default=0, show_default=True, help="Score only the first N images (0: all).")
@click.option("--start", default=0, show_default=True,
              help="Skip the first N images (a multiple of --batch-size; pieces of a long run give its numbers).")
@click.option("--batch-size", default=100, show_default=True, help="Images per forward pass.")
@click.option("--seed", default=0, show_default=True, help="Noise seed.")
@click.option("--threads", default=0, show_default=True, help="torch threads (0: torch's default).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, data, iw, k_list, ood_specs, hist, with_au, limit, start, batch_size, seed, threads, as_json, debug):
    """Evaluate a checkpoint's bounds on a data set (and, with --ood, its OOD detection against other sets)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        if iw < 1:
            raise ValueError(f"--iw must be >= 1, got {iw}")
        if hist and not ood_specs:
            raise ValueError("--hist needs at least one --ood data spec")
        model, meta = load_model(ckpt)
        ks = parse_k_list(k_list, model.cfg.n_layers)
        if batch_size < 1 or start < 0 or start % batch_size:
            raise ValueError(f"--start must be a multiple of --batch-size ({batch_size}) and >= 0, got {start}")
        images = load_for_model(data, meta, start + limit if limit else None)
        if start >= len(images):
            raise ValueError(f"--start {start} is past the end of {data} ({len(images)} images)")
        cat = per_image(model, images[start:], iw, ks, batch_size, seed, first_batch=start // batch_size,
                        progress=not as_json and sys.stderr.isatty())
        res = {"ckpt": str(ckpt), "data": data, "start": start, **summarize(model, cat, iw, ks)}
        if with_au:
            res["active_units"] = active_units(model, images[start:])
        if ood_specs:
            res["ood"], ood_cats = ood_report(model, meta, cat, ood_specs, ks, limit or None, batch_size, seed)
            if hist:
                first = res["ood"][ood_specs[0]]["auroc"]
                plot_histograms(hist, data, cat, ood_cats, ks, max(first, key=first.get),
                                int(np.prod(model.cfg.image_shape)))
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        if debug:
            raise
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(res))
        return
    _print_summary(res, data, iw, ks)


if __name__ == "__main__":
    main()
