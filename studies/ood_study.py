"""Study: OOD candidate models trained for one budget, then scored.
Fed: docs/ood.md (the study, models/ood28.pt's recipe, the draw spread).

The OOD study: candidate models trained for the same short budget, then scored.

    python -m studies.ood_study train CANDIDATE --minutes 20 --threads 1    # one candidate, one core
    python -m studies.ood_study eval --runs runs/study --json study.json     # every candidate's snapshots
    python -m studies.ood_study progress --run-dir models/ood28_run --out docs/ood_progress.jsonl
    python -m studies.ood_study curves --progress docs/ood_progress.jsonl --png docs/ood_progress.png
    python -m studies.ood_study spread --ckpt models/ood28.pt --json docs/ood_spread.json

Each candidate is a (model config, training config) pair derived from the shipped default28 recipe, so the
table shows what each lever changes. Training uses Fashion-MNIST train only (validation: 5% held out);
the evaluation reports the validation ELBO from the training log and, for every epoch snapshot, AUROC of
L1, L>k and LLR>k on Fashion-MNIST test vs MNIST (class-balanced) and vs scikit-learn's digits, in
PyTorch, with the noise the served scorer would draw. No OOD data enters training or the choice of a
checkpoint within a run: the snapshots are scored only to show how AUROC grows with training time.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import torch

from biva_core.checkpoint import load_model, read_checkpoint
from biva_core.config import BivaConfig, preset
from biva_core.data import load_for_model
from biva_core.scoring import ScoreRequest
from biva_core.evaluate import per_image, scores_of
from biva_core.stats import auroc
from biva_core.train import TrainConfig, train

BASE_TRAIN = TrainConfig(data="fashion-mnist:train", binarize="threshold", batch_size=64, lr=2e-3, free_bits=2.0,
                         free_bits_until=1.0, epochs=1000, compile=True, keep_epochs=True)


def _hvae(channels: int) -> BivaConfig:
    # the ood28 preset (hvae-oodd's latent shape as a BIVA) with another width
    return replace(preset("ood28"), stages=tuple(replace(s, channels=channels) for s in preset("ood28").stages))


def _conv_bottom(cfg: BivaConfig) -> BivaConfig:
    first = replace(cfg.stages[0], z_dim=8, dense=False)
    return replace(cfg, stages=(first, *cfg.stages[1:]))


CANDIDATES: dict[str, tuple[BivaConfig, TrainConfig]] = {
    "default28": (preset("default28"), BASE_TRAIN),
    "default28-convz1": (_conv_bottom(preset("default28")), BASE_TRAIN),
    "hvae48": (_hvae(48), BASE_TRAIN),
    "hvae64": (_hvae(64), BASE_TRAIN),
    "hvae48-bernoulli": (_hvae(48), replace(BASE_TRAIN, binarize="bernoulli")),
    "hvae48-warmup": (_hvae(48), replace(BASE_TRAIN, free_bits=0.0, kl_warmup=2.0)),
}


@click.group()
def cli() -> None:
    """Train and score the OOD study's candidates."""


@cli.command("train")
@click.argument("candidate", type=click.Choice(sorted(CANDIDATES)))
@click.option("--minutes", default=20.0, show_default=True, help="Wall-time budget, compilation included.")
@click.option("--threads", default=1, show_default=True, help="torch threads (two runs side by side: 1 each).")
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/study"),
              show_default=True, help="Folder of the study's run folders.")
def train_cmd(candidate: str, minutes: float, threads: int, runs: Path) -> None:
    """Train one candidate for a fixed wall-time budget."""
    torch.set_num_threads(threads)
    cfg, tc = CANDIDATES[candidate]
    run_dir = runs / candidate
    run_dir.mkdir(parents=True, exist_ok=True)
    train(cfg, replace(tc, max_minutes=minutes), run_dir / "model.pt", run_dir)


OOD_SETS = ("mnist", "digits")


def score_checkpoint(path: Path, n: int = 1000, in_spec: str = "fashion-mnist:test", estimator: str = "sample"
                     ) -> dict:
    """AUROC of every score (L1, L>k, LLR>k for k = 1..L-1) vs each OOD set, and the test ELBO, of one checkpoint,
    by `estimator` (the study's rows: one draw, "sample")."""
    model, meta = load_model(path)
    model.eval()
    req = ScoreRequest(estimator, 1, 1, tuple(range(1, model.cfg.n_layers)), want_iw=False)
    cats = {spec: per_image(model, load_for_model(spec, meta, n), req) for spec in (in_spec, *OOD_SETS)}
    scores = {spec: scores_of(c, req) for spec, c in cats.items()}
    return {"test_elbo": float(cats[in_spec]["elbo"].mean()),
            "auroc": {spec: {name: auroc(scores[in_spec][name], v) for name, v in scores[spec].items()}
                      for spec in OOD_SETS}}


def _snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.stem.split("_")[1]), p) for p in run_dir.glob("epoch_*.pt"))


def score_run(run_dir: Path, n: int, last_only: bool) -> list[dict]:
    """One row per epoch snapshot: training minutes and validation ELBO from the log, then the scores."""
    log = {r["epoch"]: r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}
    snaps = _snapshots(run_dir)
    rows = []
    for epoch, path in snaps[-1:] if last_only else snaps:
        r = log[epoch]
        rows.append({"candidate": run_dir.name, "epoch": epoch, "step": r["step"], "minutes": round(r["minutes"], 1),
                     "val_elbo": r["val_elbo"], **score_checkpoint(path, n)})
        click.echo(json.dumps(rows[-1]), err=True)
    return rows


def best(auroc: dict[str, float]) -> tuple[str, float]:
    name = max(auroc, key=auroc.get)
    return name, auroc[name]


def markdown(rows: list[dict]) -> str:
    """The README's study table: one line per row, the best score per OOD set and every LLR>k."""
    head = "| candidate | epoch | steps | minutes | val -L_1 | test -L_1 | MNIST: best | MNIST: LLR>k | digits: best |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        m, d = r["auroc"]["mnist"], r["auroc"]["digits"]
        llr = ", ".join(f"{v:.3f}" for k, v in m.items() if k.startswith("LLR"))
        bm, bd = best(m), best(d)
        lines.append(f"| {r['candidate']} | {r['epoch']} | {r.get('step', '')} | {r['minutes']:.0f} | {-r['val_elbo']:.1f} | "
                     f"{-r['test_elbo']:.1f} | {bm[1]:.3f} ({bm[0]}) | {llr} | {bd[1]:.3f} ({bd[0]}) |")
    return "\n".join(lines)


@cli.command("eval")
@click.option("--runs", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("runs/study"),
              show_default=True, help="Folder of the study's run folders.")
@click.option("--candidates", default="", help="Comma-separated names (default: every run folder).")
@click.option("--n", default=1000, show_default=True, help="Images per set (MNIST: n/10 per class).")
@click.option("--last-only", is_flag=True, help="Score only each run's last snapshot.")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append the rows to this JSON-lines file.")
def eval_cmd(runs: Path, candidates: str, n: int, last_only: bool, threads: int, json_out: Path | None) -> None:
    """Score each candidate's snapshots: validation ELBO, test ELBO, AUROC vs MNIST and vs digits."""
    torch.set_num_threads(threads)
    names = [c for c in candidates.split(",") if c] or sorted(p.name for p in runs.iterdir() if p.is_dir())
    rows = [row for name in names for row in score_run(runs / name, n, last_only)]
    if json_out:
        with open(json_out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    click.echo(markdown(rows))


@cli.command("progress")
@click.option("--run-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="The long run's folder (its last.pt and log.jsonl).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON-lines file the row is appended to (committed: AUROC against training time).")
@click.option("--n", default=1000, show_default=True, help="Images per set (MNIST: n/10 per class).")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
def progress_cmd(run_dir: Path, out: Path, n: int, threads: int) -> None:
    """Score a long run's current EMA weights and append the row: how AUROC grows with training time."""
    torch.set_num_threads(threads)
    epoch = int(read_checkpoint(run_dir / "last.pt")["train_state"]["epoch"])  # the log may be one row ahead
    last = next(r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["epoch"] == epoch)
    row = {"run": run_dir.name, "epoch": last["epoch"], "step": last["step"], "minutes": round(last["minutes"], 1),
           "val_elbo": last["val_elbo"], **score_checkpoint(run_dir / "last.pt", n)}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    click.echo(markdown([{**row, "candidate": row["run"]}]))


def log_fit(steps: list[float], aurocs: list[float], target: float) -> dict[str, float]:
    """Least-squares AUROC = a + b log2(steps): the gain per doubling of training and the steps where the
    line reaches `target` (inf where it does not grow). An extrapolation, not a promise: AUROC saturates."""
    b, a = np.polyfit(np.log2(np.asarray(steps, float)), np.asarray(aurocs, float), 1)
    reach = float(2 ** ((target - a) / b)) if b > 0 else float("inf")
    return {"per_doubling": float(b), "intercept": float(a), "target": target, "steps_to_target": reach}


def _best(row: dict, ood: str) -> float:
    return best(row["auroc"][ood])[1]


@cli.command("curves")
@click.option("--progress", "progress_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=Path("docs/ood_progress.jsonl"), show_default=True, help="Rows written by `progress`.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=Path("models/ood28_run/log.jsonl"), show_default=True, help="The run's validation log.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the plot here.")
@click.option("--target", default=0.95, show_default=True, help="AUROC the extrapolation aims at.")
def curves_cmd(progress_path: Path, log_path: Path, png: Path | None, target: float) -> None:
    """Best AUROC (of L1, L>k, LLR>k; vs MNIST, vs digits) and validation -L_1 against steps, with the
    log-linear fit of each."""
    rows = sorted(map(json.loads, progress_path.read_text().splitlines()), key=lambda r: r["step"])
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    fits = {ood: log_fit([r["step"] for r in rows], [_best(r, ood) for r in rows], target)
            for ood in OOD_SETS} if len(rows) >= 2 else {}
    click.echo(json.dumps(fits))
    if png is None:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ood, fit in fits.items():
        steps = np.array([r["step"] for r in rows], float)
        ax.plot(steps, [_best(r, ood) for r in rows], "o-", label=f"best score vs {ood} (last: {best(rows[-1]['auroc'][ood])[0]})")
        grid = np.geomspace(steps.min(), max(steps.max(), min(fit["steps_to_target"], 1e6)), 50)
        ax.plot(grid, fit["intercept"] + fit["per_doubling"] * np.log2(grid), "--", alpha=0.6,
                label=f"fit: +{fit['per_doubling']:.3f} per doubling")
    ax.axhline(target, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="training steps (batch 64)", ylabel="AUROC, Fashion-MNIST test vs OOD")
    ax.legend(fontsize=7)
    bx.plot([r["step"] for r in log], [-r["val_elbo"] for r in log], "o-")
    bx.set(xscale="log", xlabel="training steps (batch 64)", ylabel="validation -L_1 (nats)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def draw_spread(model, images: np.ndarray, draws: int, ks: tuple[int, ...], seed: int = 0) -> dict:
    """Where a one-draw OOD score's error comes from: for L_1 and each LLR^{>k}, the spread of one draw's value
    across `draws` draws for the same image (mean over images of the per-image standard deviation) against the
    spread across images of each image's mean over the draws. Noise from the stream the server draws."""
    from biva_core.noise import NoiseStream
    from biva_core.objectives import draw_log_weights

    x = torch.from_numpy(images)
    eps = NoiseStream(seed).take((draws, len(x), model.noise_dim)).transpose(0, 1)  # (B, S, N)
    k = torch.tensor(ks, dtype=torch.int64).repeat(len(x), 1)  # (B, J)
    with torch.no_grad():
        log_w, gt_k, _ = draw_log_weights(model, x, eps, k)
    per = {"L1": log_w.numpy(), **{f"LLR>{kk}": (log_w - gt_k[:, :, j]).numpy() for j, kk in enumerate(ks)}}
    return {name: {"within_image_sd": float(v.std(axis=1, ddof=1).mean()),
                   "between_images_sd_of_mean": float(v.mean(axis=1).std(ddof=1)),
                   "within_sd_of_a_mean_of_16": float(v.std(axis=1, ddof=1).mean() / 4.0)} for name, v in per.items()}


@cli.command("spread")
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=Path("models/ood28.pt"),
              show_default=True, help="Checkpoint.")
@click.option("--data", "specs", multiple=True, default=("fashion-mnist:test", "mnist"), show_default=True,
              help="Data specs (repeatable): each is measured on its own.")
@click.option("--n", default=200, show_default=True, help="Images per set (class-balanced sets: 20 per class).")
@click.option("--draws", default=32, show_default=True, help="Draws of the latents per image.")
@click.option("--threads", default=2, show_default=True, help="torch threads.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write JSON.")
def spread_cmd(ckpt: Path, specs: tuple[str, ...], n: int, draws: int, threads: int, json_out: Path | None) -> None:
    """Spread of one-draw L_1 and LLR^{>k} across draws for one image vs across images."""
    torch.set_num_threads(threads)
    model, meta = load_model(ckpt)
    model.eval()
    ks = tuple(range(1, model.cfg.n_layers))
    out = {"checkpoint": str(ckpt), "n": n, "draws": draws,
           "sets": {s: draw_spread(model, load_for_model(s, meta, n), draws, ks) for s in specs}}
    for spec, rows in out["sets"].items():
        click.echo(f"{spec} ({n} images, {draws} draws each): nats")
        for name, r in rows.items():
            click.echo(f"  {name:<7} across draws, one image {r['within_image_sd']:7.2f}   across images "
                       f"{r['between_images_sd_of_mean']:7.2f}   a mean of 16 draws {r['within_sd_of_a_mean_of_16']:6.2f}")
    if json_out:
        json_out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    cli()
