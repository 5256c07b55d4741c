"""`biva-client`: a thin command line over biva_client's library functions, talking to a Triton server.

    biva-client sample --n 64 --out samples.png
    biva-client likelihood --data fashion-mnist:test --iw 1000 --limit 1000 --out ll.csv
    biva-client ood score --in fashion-mnist:test --ood mnist --limit 1000 --plot ood.png
    biva-client ood fit --in fashion-mnist:train --limit 4000 --out detector.json    # in-distribution data only
    biva-client ood check --threshold detector.json --data npy:new.npy     # exit 3 if any input flagged
    biva-client ood detect --data npy:new.npy                              # the server's own detector
    biva-client reconstruct --data fashion-mnist:test --k 0,1,2,3 --out grid.png
    biva-client encode --data fashion-mnist:test --limit 1000 --out latents.npz

Seeds: a job split into requests gives batch i (of --batch-size images) the seed --seed + i, so the same
seed and batch size give the same numbers (and match `biva-eval --seed S --batch-size B`).

Exit codes: 0 ok; 1 the server answered with an error (or an unexpected failure); 2 bad command line or
input data (nothing is sent); 3 `ood check` flagged at least one input; 4 server unreachable or model not
ready; 5 a request timed out; 130 interrupted (Ctrl-C; rows already written are kept). Errors are one line
on stderr; --debug shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import click
import numpy as np

from biva_core.contract import ESTIMATORS, MODEL_PREFIX, OOD_ESTIMATOR
from biva_core.scoring import ScoreRequest
from biva_core.data import DATA_SPEC_HELP
from biva_core.stats import DETECTOR, SCORE_NAMES, needs_iw, request_of, score_help, statistic_names

from .api import (EXIT_ERROR, EXIT_FLAGGED, EXIT_INPUT, EXIT_INTERRUPTED, PROTOCOLS, BivaClient, ClientError,
                  InputError, default_url)
from .tasks import parse_k_list as parse_ks_cli

MEAN_SAMPLES = 16  # the mean estimator's default draws: 0.976 AUROC vs MNIST on ood28, 4 gave 0.954 (docs/ood.md)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DATA_HELP = ("Data spec (biva_core.data syntax), e.g. fashion-mnist:test, digits, npy:FILE, images:DIR; "
             "preprocessed as the served model's test set was (binary models: binarised the same way).")


@dataclass(frozen=True)
class Settings:
    """The group's options, handed to every command."""

    url: str  # host:port of Triton's HTTP or gRPC endpoint
    protocol: str  # "http" or "grpc"
    model_prefix: str  # front models are PREFIX{sample,regenerate,encode,score}
    batch_size: int  # images per request
    concurrency: int  # requests in flight at once
    timeout: float  # seconds per request
    seed: int  # base seed: batch i of a job uses seed + i
    retries: int  # extra tries for transient failures
    progress: bool | None  # progress bars: True, False, or None (only on a terminal)
    debug: bool  # tracebacks instead of one-line errors

    def client(self) -> BivaClient:
        return BivaClient(self.url, self.protocol, self.model_prefix, self.timeout, self.retries)

    def job(self, seed: int):
        from .tasks import Job

        return Job(seed, self.batch_size, self.concurrency, self.progress)


LIMIT_OPTION = click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images.")
SEED_OPTION = click.option("--seed", type=click.IntRange(0), default=None,
                           help="Base seed [default: the group's --seed].")


def _writable(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """An output path is checked before anything is sent: the file, or the nearest existing folder above it
    (missing folders are created later), must be writable."""
    if value is None:
        return value
    target = value
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.exists():
        target = Path(".")
    folder = target if target.is_dir() else target.parent
    ok = target.is_dir() if target != value else not value.is_dir()  # a file above the path: never writable
    try:  # access() says yes to root for read-only file systems and /proc: try it
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        ok = False
    if not ok:
        raise click.BadParameter(f"cannot write {value} ({folder} is not a writable folder)", ctx, param)
    return value


def _output_option(flag: str, default: Path | None, help: str):
    """An output file option, checked writable as the command line is parsed (before anything is sent)."""
    return click.option(flag, type=click.Path(dir_okay=False, path_type=Path), callback=_writable, default=default,
                        show_default=default is not None, help=help)


def _seed(settings: Settings, seed: int | None) -> int:
    return settings.seed if seed is None else seed


def _job_options(fn):
    """--batch-size / --concurrency also after the command name; they override the group's."""
    fn = click.option("--concurrency", type=click.IntRange(1), default=None,
                      help="Requests in flight [default: the group's --concurrency].")(fn)
    fn = click.option("--batch-size", type=click.IntRange(1), default=None,
                      help="Images per request [default: the group's --batch-size].")(fn)

    @functools.wraps(fn)
    def wrapper(settings: Settings, *args, batch_size=None, concurrency=None, **kwargs):
        settings = replace(settings, batch_size=batch_size or settings.batch_size,
                           concurrency=concurrency or settings.concurrency)
        return fn(settings, *args, **kwargs)

    return wrapper


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


@contextlib.contextmanager
def _input_errors():
    """A library's ValueError about the command line as the client's InputError (one line, exit 2)."""
    try:
        yield
    except ValueError as e:
        raise InputError(str(e)) from None


class _Group(click.Group):
    """Turns ClientError / Ctrl-C / unexpected exceptions into one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _echo_err("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as e:  # noqa: BLE001 - the user gets one line, --debug the traceback
            if ctx.obj is not None and ctx.obj.debug:
                raise
            if isinstance(e, ClientError):
                _echo_err(f"Error: {e}")
                ctx.exit(e.exit_code)
            if isinstance(e, OSError) and e.filename:  # an output that cannot be written after all
                _echo_err(f"Error: cannot write {e.filename}: {e.strerror or e}")
                ctx.exit(EXIT_INPUT)
            _echo_err(f"Error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                      "(run with --debug for the traceback)")
            ctx.exit(EXIT_ERROR)


def _group(*args, **kwargs):
    return click.group(*args, cls=_Group, **kwargs)


@_group(context_settings=CONTEXT, epilog="\b\n" + DATA_SPEC_HELP)
@click.option("--url", default=None, help="Triton endpoint host:port [default: 127.0.0.1:8000 for http, "
                                          "127.0.0.1:8001 for grpc].")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="http", show_default=True,
              help="Triton protocol.")
@click.option("--model-prefix", default=MODEL_PREFIX, show_default=True,
              help="Prefix of the front models (PREFIX sample, regenerate, encode, score).")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1),
              help="Images per request; batch i of a job uses seed --seed + i.")
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(1),
              help="Requests in flight at once (one thread and connection each).")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds to wait for one request.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="Base seed of the noise drawn on the server (a command's own --seed overrides it).")
@click.option("--retries", default=6, show_default=True, type=click.IntRange(0),
              help="Retries of transient failures (refused/reset connections, UNAVAILABLE, HTTP 5xx), "
                   "with exponential backoff.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: only on a terminal].")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, url, protocol, model_prefix, batch_size, concurrency, timeout, seed, retries,
         progress, debug):
    """Client of the BIVA models served by Triton: samples, likelihoods, OOD detection, reconstructions,
    latents. Exit codes: 0 ok, 1 server error, 2 bad input, 3 `ood check` flagged inputs, 4 server
    unreachable / model not ready, 5 timeout, 130 interrupted."""
    ctx.obj = Settings(url or default_url(protocol), protocol, model_prefix, batch_size, concurrency, timeout, seed,
                       retries, progress, debug)


def _with_client(fn: Callable[[BivaClient], object], settings: Settings):
    client = settings.client()
    try:
        return fn(client)
    finally:
        client.close()


# ---- sample ---------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT)
@click.option("--n", "n", default=64, show_default=True, type=click.IntRange(1), help="Number of samples.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Prior temperature (scales the prior's standard deviations).")
@click.option("--seed", type=click.IntRange(0), default=None,
              help="Seed [default: the group's --seed]. Above the server's max_n, chunk j uses seed + j.")
@_output_option("--out", Path("samples.png"), help="PNG grid of the samples (ceil(sqrt(n)) columns).")
@_output_option("--npy", None, help="Also save the raw images (n, C, H, W) float32 here.")
@click.pass_obj
def sample(settings: Settings, n, temperature, seed, out, npy):
    """Draw samples from the prior. The same seed gives the same images."""
    from .output import image_grid, save_png
    from .tasks import sample_images

    seed = _seed(settings, seed)
    images = _with_client(lambda c: sample_images(c, n, seed, temperature), settings)
    grid = image_grid(images)
    save_png(grid, out)
    click.echo(f"wrote {out} ({n} samples, {grid.shape[1]}x{grid.shape[0]} px grid, seed {seed}, "
               f"temperature {temperature:g})")
    if npy is not None:
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, images)
        click.echo(f"wrote {npy} {images.shape} float32")


# ---- likelihood -----------------------------------------------------------------------------------

def _format_summary(summary: dict, what: str) -> str:
    lines = [what]
    for key, label in (("L1", "L_1"), ("LK", "L_K")):
        if f"{key}_nats" in summary:
            nats, bpd = summary[f"{key}_nats"], summary[f"{key}_bpd"]
            lines.append(f"  {label:<4} {nats['mean']:10.3f} +- {nats['se']:.3f} nats   "
                         f"{bpd['mean']:.4f} +- {bpd['se']:.4f} bits/dim   (n = {nats['n']})")
    kl = summary["KL_nats"]
    lines.append(f"  KL   {kl['mean']:10.3f} +- {kl['se']:.3f} nats")
    return "\n".join(lines)


@main.command(context_settings=CONTEXT)
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--iw", default=1, show_default=True, type=click.IntRange(1),
              help="Importance samples K: adds L_K (the tighter bound) to L_1.")
@LIMIT_OPTION
@SEED_OPTION
@_output_option("--out", None, help="Per-image rows (.csv, .json or .jsonl), written batch by batch in input order.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
@_job_options
def likelihood(settings: Settings, data, iw, limit, seed, out, as_json):
    """Per-image L_1 (and L_K with --iw) in nats and bits/dim; prints mean, standard error and n."""
    from .output import RowWriter
    from .tasks import likelihood_columns, likelihood_rows, likelihood_summary, load_inputs, score_images

    seed = _seed(settings, seed)

    def run(client: BivaClient):
        meta = client.meta
        images = load_inputs(data, meta, limit)
        if out is not None and out.suffix.lower() not in RowWriter.FORMATS:
            raise InputError(f"--out: expected a file ending in {', '.join(RowWriter.FORMATS)}, got {str(out)!r}")
        writer = RowWriter(out, likelihood_columns(iw)) if out is not None else None
        on_batch = (lambda i, start, s: writer.write(likelihood_rows(start, s, meta.n_dims, iw))) if writer else None
        try:
            table = score_images(client, images, settings.job(seed), ScoreRequest("sample", 1, iw, (), iw > 1),
                                 on_batch, desc="bounds")
        except KeyboardInterrupt:
            if writer is not None:
                _echo_err(f"interrupted: {writer.count} rows kept in {out}")
            raise
        finally:
            if writer is not None:
                writer.close()
        return likelihood_summary(table, meta.n_dims), len(images)

    summary, n = _with_client(run, settings)
    if as_json:
        click.echo(json.dumps({"data": data, "iw": iw, "seed": seed, "batch_size": settings.batch_size, **summary}))
    else:
        click.echo(_format_summary(summary, f"{data}: {n} images, iw {iw}, base seed {seed}, "
                                            f"batch size {settings.batch_size}"))
    if out is not None:
        click.echo(f"wrote {out}")


# ---- ood ------------------------------------------------------------------------------------------

@_group(context_settings=CONTEXT, epilog="Scores, oriented larger = more anomalous: " + score_help() + ".")
def ood():
    """Out-of-distribution detection with L_1, L^{>k}, LLR^{>k} (Havtorn et al., 2021) and a fitted detector.

    \b
    ood score    AUROC / AUPRC / FPR@95%TPR of every score, in-distribution vs OOD set
    ood fit      fit a detector (or one score's threshold) on in-distribution data only
    ood check    flag inputs with a fitted file, scored through biva_score (exit code 3 if any is flagged)
    ood detect   flag inputs with the detector the server deploys (biva_detect; exit code 3 if any is flagged)

    The estimator says how L_1 and L^{>k} are estimated from draws of the latents: mode (every latent at its mean;
    a score, not a bound), mean of --samples draws, or one sample (bounds on log p(x)). The scores are listed
    below.
    """


main.add_command(ood)

ESTIMATOR_HELP = ("How L_1 and L^{>k} are estimated: mode (every latent at its mean, deterministic), mean (of "
                  "--samples draws) or sample (one draw).")


def _estimator_options(default: str | None):
    """--estimator and --samples; default None: take them from the fitted file."""
    def wrap(fn):
        fn = click.option("--samples", type=click.IntRange(1), default=None,
                          help="Draws S of the mean estimator [default: 16 for mean, else 1].")(fn)
        return click.option("--estimator", type=click.Choice(ESTIMATORS), default=default,
                            show_default=default is not None, help=ESTIMATOR_HELP)(fn)
    return wrap


def _samples(estimator: str, samples: int | None) -> int:
    if samples is not None and samples != 1 and estimator != "mean":
        raise InputError(f"--samples {samples}: only the mean estimator averages draws (got --estimator {estimator})")
    return samples or (MEAN_SAMPLES if estimator == "mean" else 1)


def _score_set(client: BivaClient, settings: Settings, spec: str, limit, seed: int, req: ScoreRequest, desc: str):
    from .tasks import load_inputs, score_images

    return score_images(client, load_inputs(spec, client.meta, limit), settings.job(seed), req, desc=desc)


def _served_detector(client: BivaClient, choice: str) -> bool:
    """Whether `ood score` also asks biva_detect: --detector served, or auto and the server deploys one."""
    if choice == "none" or choice not in ("auto", "served"):
        return False
    try:
        client.ensure_ready("detect")
        return True
    except ClientError:
        if choice == "served":
            raise
        return False


def _detector_scores(client, settings, sets: list, seed, choice: str, tables) -> list[dict] | None:
    """The detector's scores of every set (images in `sets`, scored in `tables`): a fitted file's (computed here
    from the tables' statistics when it matches their request), or the served detector's; None without one."""
    from .tasks import detect_images

    if choice not in ("auto", "served", "none"):
        det = _read_fit(Path(choice), client.meta)
        if (det.estimator, det.samples, det.ks) != (tables[0].request.estimator, tables[0].request.samples,
                                                     tables[0].ks):
            raise InputError(f"--detector {choice} was fitted with estimator {det.estimator}, samples {det.samples}, "
                             f"k {list(det.ks)}; score with the same (--estimator, --samples, --k)")
        return [{"detector": det.scores(t.elbo, t.kl, t.l_gt_k, t.iw_bound)} for t in tables]
    if not _served_detector(client, choice):
        return None
    return [{"detector": detect_images(client, x, settings.job(seed), desc=f"detect {d}")[0]} for x, d in sets]


@ood.command("score", context_settings=CONTEXT)
@click.option("--in", "in_spec", required=True, help="In-distribution data. " + DATA_HELP)
@click.option("--ood", "ood_specs", required=True, multiple=True,
              help="Out-of-distribution data (repeatable: each set against --in). " + DATA_HELP)
@click.option("--k", "k_list", default=None, help="Comma-separated k for L^{>k}, LLR^{>k} [default: 1..L-1].")
@_estimator_options(OOD_ESTIMATOR)
@click.option("--iw", default=1, show_default=True, type=click.IntRange(1), help="Also score with L_K, K = iw.")
@click.option("--detector", "detector", default="auto", show_default=True,
              help="Also report a detector: a file `ood fit` wrote, 'served' (biva_detect), 'none', or auto: the "
                   "served one where the server deploys it.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images of each set.")
@click.option("--seed", type=click.IntRange(0), default=None,
              help="Base seed of each set's batches [default: the group's --seed].")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON, one line per OOD set.")
@_output_option("--plot", None, help="PNG with score histograms of every set (paper's Figure 4) and ROC curves.")
@click.pass_obj
@_job_options
def ood_score(settings: Settings, in_spec, ood_specs, k_list, estimator, samples, iw, detector, limit, seed, as_json,
              plot):
    """Score the sets; print AUROC, AUPRC and FPR at 95% TPR per score, each OOD set against --in (OOD = positive)."""
    from biva_core.plots import plot_ood
    from biva_core.stats import detection_table, format_table

    from .tasks import load_inputs, parse_k_list, score_images

    seed = _seed(settings, seed)
    specs = (in_spec, *ood_specs)

    def run(client: BivaClient):
        req = ScoreRequest(estimator, _samples(estimator, samples), iw, parse_k_list(k_list, client.meta.n_layers),
                           want_iw=iw > 1)
        sets = [(load_inputs(s, client.meta, limit), s) for s in specs]  # every set checked before anything is sent
        tables = [score_images(client, x, settings.job(seed), req, desc=d) for x, d in sets]
        scores = [t.scores() for t in tables]
        extra = _detector_scores(client, settings, sets, seed, detector, tables)
        if extra is not None:
            scores = [{**s, **e} for s, e in zip(scores, extra)]
        return req, tables, scores

    req, tables, scores = _with_client(run, settings)
    if plot is not None:
        plot_ood(scores[0], dict(zip(ood_specs, scores[1:])), plot, in_spec)
    for spec, t, s in zip(ood_specs, tables[1:], scores[1:]):
        table = detection_table(scores[0], s)
        head = {"in": in_spec, "ood": spec, "n_in": len(tables[0].elbo), "n_ood": len(t.elbo), "ks": list(req.ks),
                "iw": iw, "estimator": req.estimator, "samples": req.samples, "seed": seed}
        if as_json:
            click.echo(json.dumps({**head, "metrics": table}))
            continue
        click.echo(f"in: {in_spec} ({len(tables[0].elbo)} images)   OOD: {spec} ({len(t.elbo)} images)   estimator "
                   f"{req.estimator}" + (f" (S = {req.samples})" if req.estimator == "mean" else "")
                   + f"   base seed {seed}")
        click.echo(format_table(table) + "\n")
    if plot is not None and not as_json:
        click.echo(f"wrote {plot}")


@ood.command("fit", context_settings=CONTEXT)
@click.option("--in", "in_spec", required=True, help="In-distribution data to fit on (never OOD data). " + DATA_HELP)
@click.option("--score", "score_name", default=DETECTOR, show_default=True,
              help=f"{DETECTOR} (kernel densities of L_1, the KL per group, every L^{{>k}} and LLR^{{>k}}), or one "
                   f"score: {', '.join(n for n in SCORE_NAMES if n != DETECTOR)} (`biva-client ood --help` says "
                   "what each is; LLR>2 is also written LLR_gt2; iw is --iw).")
@_estimator_options(OOD_ESTIMATOR)
@click.option("--k", "k_list", default=None, help=f"k of the {DETECTOR}'s statistics [default: 1..L-1].")
@click.option("--tpr", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of the in-distribution data that must pass (its scores <= threshold).")
@click.option("--bandwidth", default=0.3, show_default=True, type=click.FloatRange(0, min_open=True),
              help=f"{DETECTOR}: kernel bandwidth, in standard deviations of each statistic.")
@click.option("--iw", default=1, show_default=True, type=click.IntRange(1), help="K for the LK and LLRK scores.")
@LIMIT_OPTION
@SEED_OPTION
@_output_option("--out", Path("detector.json"), help="The fitted file, for `ood check`, `ood score --detector`, "
                                                     "biva-eval and biva-export --detector.")
@click.pass_obj
@_job_options
def ood_fit(settings: Settings, in_spec, score_name, estimator, samples, k_list, tpr, bandwidth, iw, limit, seed, out):
    """Fit on in-distribution data only: inputs scoring above the threshold are flagged as out-of-distribution."""
    from biva_core.stats import Detector, canonical_score, fit_detector, fit_threshold, score_k

    seed = _seed(settings, seed)
    with _input_errors():
        name = canonical_score(score_name)
    if needs_iw(name) and iw < 2:
        raise InputError(f"score {name} needs --iw K with K >= 2")

    def run(client: BivaClient):
        L = client.meta.n_layers
        k = score_k(name)
        ks = parse_ks_cli(k_list, L) if k is None else parse_ks_cli(str(k), L)
        req = ScoreRequest(estimator, _samples(estimator, samples), iw, ks if (k is not None or name == DETECTOR)
                           else (), want_iw=iw > 1)
        return _score_set(client, settings, in_spec, limit, seed, req, "fit"), client.meta

    table, meta = _with_client(run, settings)
    base = Detector(name, table.request.estimator, table.request.samples, iw, table.ks, 0.0, tpr, meta.identity(),
                    {"data": in_spec, "n": len(table.elbo), "limit": limit, "seed": seed,
                     "batch_size": settings.batch_size},
                    names=tuple(statistic_names(meta.groups, table.ks)))
    if name == DETECTOR:
        det = fit_detector(base, table.statistics(), bandwidth)
    else:
        det = replace(base, names=(), threshold=fit_threshold(table.scores()[name], tpr))
    write_fit(out, det)
    accepted = float((det.scores(table.elbo, table.kl, table.l_gt_k, table.iw_bound) <= det.threshold).mean())
    click.echo(f"{name} ({det.estimator}): threshold {det.threshold:.4f} accepts {accepted:.1%} of {len(table.elbo)} "
               f"images of {in_spec}" + (" (scored leave-one-out: {:.1%})".format(tpr) if name == DETECTOR else "")
               + f"; wrote {out}")


def write_fit(path: Path, det) -> None:
    """Write a fitted file whole or not at all (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(det.to_json() + "\n")
    os.replace(tmp, path)


def _read_fit(path: Path, meta):
    """A file `ood fit` wrote, checked against the served model: InputError (one line) naming both otherwise."""
    from biva_core.stats import Detector

    try:
        det = Detector.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a file written by `ood fit` ({type(e).__name__}: {e})") from None
    fitted, served = det.checkpoint() or "?", meta.checkpoint_sha256
    if fitted != served:
        raise InputError(f"{path} was fitted on the model with checkpoint sha256 {str(fitted)[:12]}..., the server's "
                         f"model is {served[:12]}...; fit it again on this model")
    return det


@ood.command("check", context_settings=CONTEXT)
@click.option("--threshold", "threshold_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="File written by `ood fit` (a detector or one score's threshold).")
@click.option("--data", required=True, help=DATA_HELP)
@_estimator_options(None)
@LIMIT_OPTION
@SEED_OPTION
@_output_option("--out", None, help="Per-image rows (.csv/.json/.jsonl) [default: CSV on stdout].")
@click.pass_obj
@_job_options
def ood_check(settings: Settings, threshold_file, data, estimator, samples, limit, seed, out):
    """Flag each input whose score exceeds the fitted threshold, with the file's estimator and k (a different
    --estimator or --samples is refused). Exit code 0 if none is flagged, 3 if any is."""
    seed = _seed(settings, seed)

    def run(client: BivaClient):
        det = _read_fit(threshold_file, client.meta)
        if (estimator, samples) != (None, None) and (estimator or det.estimator, samples or det.samples) != \
                (det.estimator, det.samples):
            raise InputError(f"{threshold_file} was fitted with estimator {det.estimator} (samples {det.samples}); "
                             f"got --estimator {estimator or det.estimator} --samples {samples or det.samples}")
        req = det.request()
        return det, _score_set(client, settings, data, limit, seed, req, "check")

    det, table = _with_client(run, settings)
    scores = det.scores(table.elbo, table.kl, table.l_gt_k, table.iw_bound)
    _report_flags(scores, scores > det.threshold, out, f"{det.score} ({det.estimator}) > {det.threshold:.4f}")


def _report_flags(scores: np.ndarray, flagged: np.ndarray, out: Path | None, what: str) -> None:
    from .output import RowWriter

    rows = [{"index": i, "score": float(s), "flagged": int(f)} for i, (s, f) in enumerate(zip(scores, flagged))]
    if out is not None:
        with RowWriter(out, ["index", "score", "flagged"]) as w:
            w.write(rows)
    else:
        click.echo("index,score,flagged")
        for r in rows:
            click.echo(f"{r['index']},{r['score']:.6g},{r['flagged']}")
    _echo_err(f"{int(flagged.sum())} of {len(rows)} inputs flagged ({what})" + (f"; wrote {out}" if out else ""))
    if flagged.any():
        click.get_current_context().exit(EXIT_FLAGGED)


@ood.command("detect", context_settings=CONTEXT)
@click.option("--data", required=True, help=DATA_HELP)
@LIMIT_OPTION
@SEED_OPTION
@_output_option("--out", None, help="Per-image rows (.csv/.json/.jsonl) [default: CSV on stdout].")
@click.pass_obj
@_job_options
def ood_detect(settings: Settings, data, limit, seed, out):
    """Flag each input with the detector the server deploys (biva_detect: images in, a score and a flag per image
    out). Exit code 0 if none is flagged, 3 if any is."""
    from .tasks import detect_images, load_inputs

    seed = _seed(settings, seed)

    def run(client: BivaClient):
        x = load_inputs(data, client.meta, limit)
        return client.detector(), detect_images(client, x, settings.job(seed))

    summary, (scores, flagged) = _with_client(run, settings)
    _report_flags(scores, flagged, out, f"served {summary['score']} ({request_of(summary).estimator}) > "
                                         f"{summary['threshold']:.4f}")


# ---- reconstruct / encode -------------------------------------------------------------------------

@main.command(context_settings=CONTEXT)
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--k", "k_list", default=None, help="Comma-separated k: redraw layers 1..k [default: 0..L].")
@click.option("--limit", default=8, show_default=True, type=click.IntRange(1), help="Inputs (rows of the grid).")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Temperature of the redrawn layers.")
@SEED_OPTION
@_output_option("--out", Path("reconstructions.png"),
                help="PNG grid: one row per input, the input first, then one labelled column per k.")
@_output_option("--npy", None, help="Also save the grid's images (N, 1 + len(k), C, H, W) float32 here.")
@click.pass_obj
@_job_options
def reconstruct(settings: Settings, data, k_list, limit, temperature, seed, out, npy):
    """Encode, then regenerate the bottom k layers for each k (the paper's Figure 12)."""
    from biva_core.plots import plot_grid

    from .tasks import load_inputs, parse_k_list
    from .tasks import reconstruct as run_reconstruct

    seed = _seed(settings, seed)

    def run(client: BivaClient):
        L = client.meta.n_layers
        ks = parse_k_list(k_list if k_list is not None else ",".join(map(str, range(L + 1))), L)
        images = load_inputs(data, client.meta, limit)
        return run_reconstruct(client, images, ks, seed, settings.batch_size, temperature), ks

    stack, ks = _with_client(run, settings)
    plot_grid(stack, ["input", *(f"k = {k}" for k in ks)], out)
    click.echo(f"wrote {out} ({stack.shape[0]} inputs x [input, k = {', '.join(map(str, ks))}], seed {seed})")
    if npy is not None:
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, stack)
        click.echo(f"wrote {npy} {stack.shape} float32")


@main.command(context_settings=CONTEXT)
@click.option("--data", required=True, help=DATA_HELP)
@LIMIT_OPTION
@SEED_OPTION
@_output_option("--out", Path("latents.npz"), help="Output .npz.")
@click.pass_obj
@_job_options
def encode(settings: Settings, data, limit, seed, out):
    """Posterior of every input: q_mu, q_log_std, a sample z (N, D) and KL per group (N, G).

    The .npz holds the flat arrays in the model's layout plus `groups` (the group names in layout order);
    the server does not publish group sizes, so per-group slices are left to the reader.
    """
    from .tasks import encode_images, image_seeds, load_inputs

    seed = _seed(settings, seed)

    def run(client: BivaClient):
        images = load_inputs(data, client.meta, limit)
        return encode_images(client, images, settings.job(seed)), \
            client.meta

    enc, meta = _with_client(run, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, q_mu=enc.q_mu, q_log_std=enc.q_log_std, z=enc.z, kl=enc.kl, groups=np.array(meta.groups),
             seeds=image_seeds(len(enc.z), settings.batch_size, seed), image_shape=np.array(meta.image_shape),
             meta=meta.to_json())
    click.echo(f"wrote {out}: q_mu, q_log_std, z {enc.z.shape}, kl {enc.kl.shape}, groups {', '.join(meta.groups)}")


if __name__ == "__main__":
    main()
