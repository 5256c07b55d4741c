"""`biva-eval`: L_1, L_K, L^{>k}, LLR^{>k} and KL per latent on a data set, in nats and bits/dim, and (with
--ood) the AUROC of every OOD score: the PyTorch reference of what the served models compute.

    biva-eval --ckpt models/default28.pt --data fashion-mnist:test --iw 1000 --k 0,1,2 --limit 500 --json
    biva-eval --ckpt models/ood28.pt --data fashion-mnist:test --ood mnist --estimator mode --limit 1000 \
        --detector models/ood28.detector.json
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, load_model, sha256_file
from .contract import DEFAULT_ESTIMATOR, ESTIMATORS, parse_ks
from .scoring import ScoreRequest
from .data import DATA_SPEC_HELP, load_for_model
from .model import Biva
from .noise import NoiseStream
from .objectives import evaluate_request
from .plots import plot_ood
from .stats import Detector, bits_per_dim, detection_table, mean_se, ood_scores


@torch.no_grad()
def per_image(model: Biva, images: np.ndarray, req: ScoreRequest = ScoreRequest(), batch_size: int = 100,
              seed: int = 0, progress: bool = False, first_batch: int = 0) -> dict[str, np.ndarray]:
    """Per-image values by `req` (estimator, samples, iw, ks): {"elbo": (N,), "iw": (N,), "kl": (N, G),
    "l_gt_k": (N, len(ks))}, "iw" only with req.want_iw.

    Batch b draws its noise from one stream seeded with seed + first_batch + b (the client sends batch b of a
    job with seed + b, so served and PyTorch numbers agree). `first_batch` lets a run over images[s:] (s a
    multiple of batch_size) draw exactly the noise a run over all images would, so a long evaluation split
    into pieces gives the numbers of one run. Draws go through in chunks of at most 64 draws and 4096 rows.
    """
    per = {"elbo": [], "iw": [], "kl": [], "l_gt_k": []}
    starts = range(0, len(images), batch_size)
    for b, i in enumerate(tqdm(starts, disable=not progress, desc="eval")):
        x = torch.from_numpy(images[i:i + batch_size])
        res = evaluate_request(model, x, NoiseStream(seed + first_batch + b), req,
                               chunk=max(1, min(64, 4096 // len(x))))
        per["elbo"].append(res.elbo.numpy())
        per["kl"].append(res.kl.numpy())
        per["l_gt_k"].append(np.stack([res.l_gt_k[k].numpy() for k in req.ks], axis=1) if req.ks
                             else np.zeros((len(x), 0), np.float32))
        if req.want_iw:
            per["iw"].append(res.iw.numpy())
    return {k: np.concatenate(v) for k, v in per.items() if v}


def summarize(model: Biva, cat: dict[str, np.ndarray], req: ScoreRequest) -> dict:
    """Means (and standard errors) of `per_image`'s output, in nats and bits/dim; KL per latent variable."""
    n_dims = int(np.prod(model.cfg.image_shape))
    elbo = mean_se(cat["elbo"])
    out = {"n_images": elbo["n"], "estimator": req.estimator, "samples": req.samples, "elbo_nats": elbo["mean"],
           "elbo_se": elbo["se"], "bits_per_dim": float(bits_per_dim(elbo["mean"], n_dims)),
           "kl_per_layer": dict(zip(model.group_names(), map(float, cat["kl"].mean(axis=0)))),
           "kl_total": float(cat["kl"].sum(axis=1).mean()),
           "l_gt_k": {str(k): float(cat["l_gt_k"][:, j].mean()) for j, k in enumerate(req.ks)},
           "llr_gt_k": {str(k): float((cat["elbo"] - cat["l_gt_k"][:, j]).mean()) for j, k in enumerate(req.ks)}}
    if req.iw > 1 and "iw" in cat:
        m = mean_se(cat["iw"])
        out.update({"iw_samples": req.iw, "iw_nats": m["mean"], "iw_se": m["se"],
                    "iw_bits_per_dim": float(bits_per_dim(m["mean"], n_dims))})
    return out


def scores_of(cat: dict[str, np.ndarray], req: ScoreRequest, detector: Detector | None = None) -> dict[str, np.ndarray]:
    """Every OOD score of `per_image`'s output (stats.ood_scores), and the detector's where one is given."""
    out = ood_scores(cat["elbo"], cat["kl"], cat["l_gt_k"], req.ks, cat.get("iw") if req.iw > 1 else None)
    if detector is not None:
        out["detector"] = detector.scores(cat["elbo"], cat["kl"], cat["l_gt_k"], cat.get("iw"))
    return out


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


def ood_report(model: Biva, meta: dict, in_scores: dict[str, np.ndarray], job: EvalJob) -> tuple[dict, dict]:
    """Per OOD set of `job`: its summary (KL per latent included, the paper's Figure 2 idea) and the detection
    metrics of every score against the in-distribution scores. Returns (report, scores by spec) for the
    histograms."""
    report, scores = {}, {}
    for spec in job.ood_specs:
        cat = per_image(model, load_for_model(spec, meta, job.limit or None), job.req, job.batch_size, job.seed)
        scores[spec] = scores_of(cat, job.req, job.detector)
        table = detection_table(in_scores, scores[spec])
        report[spec] = {**summarize(model, cat, job.req), "auroc": {k: v["auroc"] for k, v in table.items()},
                        "metrics": table}
    return report, scores


def _print_summary(res: dict, data: str, iw: int, ks: tuple[int, ...]) -> None:
    click.echo(f"{data}: {res['n_images']} images, estimator {res['estimator']}"
               + (f" (S = {res['samples']})" if res["estimator"] == "mean" else ""))
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


@dataclass(frozen=True)
class EvalJob:
    """What one biva-eval run computes (its options, checked)."""

    data: str  # data spec of the in-distribution set
    req: ScoreRequest  # estimator, samples, iw, ks
    ood_specs: tuple[str, ...] = ()  # OOD sets scored against `data`
    limit: int = 0  # first N images of each set (0: all)
    start: int = 0  # skip the first N images of `data` (a multiple of batch_size)
    batch_size: int = 100
    seed: int = 0
    detector: Detector | None = None  # a fitted detector, scored beside the single scores
    progress: bool = False


def evaluate(model: Biva, meta: dict, job: EvalJob, with_au: bool = False) -> tuple[dict, dict, dict]:
    """The run's summary (JSON-ready), its in-distribution scores and each OOD set's scores."""
    images = load_for_model(job.data, meta, job.start + job.limit if job.limit else None)
    if job.start >= len(images):
        raise ValueError(f"--start {job.start} is past the end of {job.data} ({len(images)} images)")
    cat = per_image(model, images[job.start:], job.req, job.batch_size, job.seed,
                    first_batch=job.start // job.batch_size, progress=job.progress)
    res = {"data": job.data, "start": job.start, **summarize(model, cat, job.req)}
    if with_au:
        res["active_units"] = active_units(model, images[job.start:])
    in_scores, ood = scores_of(cat, job.req, job.detector), {}
    if job.ood_specs:
        res["ood"], ood = ood_report(model, meta, in_scores, job)
    return res, in_scores, ood


def _detector(path: Path | None, ckpt: Path, req: ScoreRequest) -> Detector | None:
    """A fitted file for this checkpoint and request, or ValueError naming what differs."""
    if path is None:
        return None
    det = Detector.from_json(path.read_text())
    if det.checkpoint() != sha256_file(ckpt):
        raise ValueError(f"--detector {path} was fitted on another checkpoint than {ckpt} (sha256 differs)")
    if (det.estimator, det.samples, det.ks) != (req.estimator, req.samples, req.ks):
        raise ValueError(f"--detector {path} was fitted with estimator {det.estimator}, samples {det.samples}, "
                         f"k {list(det.ks)}; pass the same --estimator, --samples and --k")
    return det


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Checkpoint (model.pt).")
@click.option("--data", required=True, help="Data spec.\n\n\b\n" + DATA_SPEC_HELP)
@click.option("--iw", default=1, show_default=True, help="Importance samples K for L_K (1..1000 and more).")
@click.option("--k", "k_list", default="", help="Comma-separated k for L^{>k} and LLR^{>k}, each in 0..L "
                                                 "[default: none; with --ood, 1..L-1].")
@click.option("--estimator", type=click.Choice(ESTIMATORS), default=DEFAULT_ESTIMATOR, show_default=True,
              help="How L_1 and L^{>k} are estimated: sample (one draw; bounds), mean (of --samples draws; bounds) "
                   "or mode (every latent at its mean; scores, not bounds).")
@click.option("--samples", default=1, show_default=True, help="Draws S of the mean estimator.")
@click.option("--ood", "ood_specs", multiple=True,
              help="Out-of-distribution data spec (repeatable): its bounds, KL per latent and the detection metrics "
                   "of every score against --data (same --limit, same estimator).")
@click.option("--detector", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="With --ood: also score with this fitted file (biva-client ood fit), on the same estimator and k.")
@click.option("--hist", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --ood: write the paper's Figure 4 (histograms of every score, ROC curves) to this PNG.")
@click.option("--active-units", "with_au", is_flag=True, help="Count active units per latent variable on --data.")
@click.option("--limit", default=0, show_default=True, help="Score only the first N images (0: all).")
@click.option("--start", default=0, show_default=True,
              help="Skip the first N images (a multiple of --batch-size; pieces of a long run give its numbers).")
@click.option("--batch-size", default=100, show_default=True, help="Images per forward pass.")
@click.option("--seed", default=0, show_default=True, help="Noise seed.")
@click.option("--threads", default=0, show_default=True, help="torch threads (0: torch's default).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, data, iw, k_list, estimator, samples, ood_specs, detector, hist, with_au, limit, start, batch_size,
         seed, threads, as_json, debug):
    """Evaluate a checkpoint's bounds on a data set (and, with --ood, its OOD detection against other sets)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        if (hist or detector) and not ood_specs:
            raise ValueError("--hist and --detector need at least one --ood data spec")
        if batch_size < 1 or start < 0 or start % batch_size:
            raise ValueError(f"--start must be a multiple of --batch-size ({batch_size}) and >= 0, got {start}")
        model, meta = load_model(ckpt)
        ks = parse_ks(k_list, model.cfg.n_layers) if (k_list or ood_specs) else ()
        req = ScoreRequest(estimator, samples, iw, ks, want_iw=iw > 1 or estimator == "sample")
        req.check(1, _eval_meta(model))
        job = EvalJob(data, req, tuple(ood_specs), limit, start, batch_size, seed, _detector(detector, ckpt, req),
                      progress=not as_json and sys.stderr.isatty())
        res, in_scores, ood = evaluate(model, meta, job, with_au)
        if hist:
            plot_ood(in_scores, ood, hist, data)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        if debug:
            raise
        raise click.ClickException(str(e)) from None
    res["ckpt"] = str(ckpt)
    if as_json:
        click.echo(json.dumps(res))
        return
    _print_summary(res, data, iw, ks)


def _eval_meta(model: Biva):
    """The caps a request of this model is checked against here (the served defaults, rows unbounded)."""
    from .contract import Caps, ModelMeta

    return ModelMeta(tuple(model.cfg.image_shape), model.cfg.likelihood, "", model.cfg.n_layers, model.latent_dim,
                     model.noise_dim, tuple(model.group_names()), 1, "", DEFAULT_ESTIMATOR,
                     Caps(max_rows=2**62))


if __name__ == "__main__":
    main()
