"""`biva-client`: a thin command line over biva_client's library functions, talking to a Triton server.

    biva-client sample --n 64 --out samples.png
    biva-client likelihood --data fashion-mnist:test --iw 1000 --limit 1000 --out ll.csv
    biva-client ood score --in fashion-mnist:test --ood digits --k 1,2,3 --plot ood.png
    biva-client ood fit --in fashion-mnist:test --score 'LLR>2' --tpr 0.95 --out threshold.json
    biva-client ood check --threshold threshold.json --data npy:new.npy      # exit 3 if any input flagged
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

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import click
import numpy as np

from biva_core.data import DATA_SPEC_HELP
from biva_export.contract import MODEL_PREFIX

from .api import (EXIT_ERROR, EXIT_FLAGGED, EXIT_INTERRUPTED, PROTOCOLS, BivaClient, ClientError, InputError,
                  default_url)

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
    ok = os.access(target, os.W_OK) and (target.is_dir() if target != value else not value.is_dir())
    if not ok:
        raise click.BadParameter(f"cannot write {value} ({target} is not writable)", ctx, param)
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
            table = score_images(client, images, settings.job(seed), iw, (), on_batch, desc="likelihood")
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

@_group(context_settings=CONTEXT)
def ood():
    """Out-of-distribution detection with L_1, L^{>k} and LLR^{>k} (Havtorn et al., 2021).

    \b
    ood score   AUROC / AUPRC / FPR@95%TPR of every score, in-distribution vs OOD set
    ood fit     calibrate a threshold on in-distribution data
    ood check   flag inputs above a threshold (exit code 3 if any is flagged)

    Scores are oriented larger = more anomalous: L1 = -L_1, LK = -L_K, L>k = -L^{>k}, LLR>k = L_1 - L^{>k}.
    """


main.add_command(ood)


def _score_set(client: BivaClient, settings: Settings, spec: str, limit, seed: int, iw: int, ks, desc: str):
    from .tasks import load_inputs, score_images

    images = load_inputs(spec, client.meta, limit)
    return score_images(client, images, settings.job(seed), iw, ks, desc=desc)


@ood.command("score", context_settings=CONTEXT)
@click.option("--in", "in_spec", required=True, help="In-distribution data. " + DATA_HELP)
@click.option("--ood", "ood_spec", required=True, help="Out-of-distribution data. " + DATA_HELP)
@click.option("--k", "k_list", default=None, help="Comma-separated k for L^{>k}, LLR^{>k} [default: 1..L-1].")
@click.option("--iw", default=1, show_default=True, type=click.IntRange(1), help="Also score with L_K, K = iw.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images of each set.")
@click.option("--seed", type=click.IntRange(0), default=None,
              help="Base seed of each set's batches [default: the group's --seed].")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@_output_option("--plot", None, help="PNG with score histograms of both sets (paper's Figure 4) and ROC curves.")
@click.pass_obj
@_job_options
def ood_score(settings: Settings, in_spec, ood_spec, k_list, iw, limit, seed, as_json, plot):
    """Score both sets; print AUROC, AUPRC and FPR at 95% TPR per score (OOD = positive class)."""
    from .metrics import format_table, ood_scores, ood_table
    from .output import plot_ood
    from .tasks import load_inputs, parse_k_list, score_images

    seed = _seed(settings, seed)

    def run(client: BivaClient):
        ks = parse_k_list(k_list, client.meta.n_layers)
        x_in = load_inputs(in_spec, client.meta, limit)
        x_ood = load_inputs(ood_spec, client.meta, limit)  # both sets checked before anything is sent

        def score(x: np.ndarray, desc: str):
            return score_images(client, x, settings.job(seed), iw, ks, desc=desc)

        return score(x_in, "in"), score(x_ood, "ood")

    a, b = _with_client(run, settings)
    table = ood_table(a, b)
    if plot is not None:
        plot_ood(ood_scores(a), ood_scores(b), plot, in_spec, ood_spec)
    if as_json:
        click.echo(json.dumps({"in": in_spec, "ood": ood_spec, "n_in": len(a.elbo), "n_ood": len(b.elbo),
                               "ks": list(a.ks), "iw": iw, "seed": seed, "metrics": table}))
    else:
        click.echo(f"in: {in_spec} ({len(a.elbo)} images)   OOD: {ood_spec} ({len(b.elbo)} images)   "
                   f"base seed {seed}")
        click.echo(format_table(table))
    if plot is not None:
        click.echo(f"wrote {plot}")


@ood.command("fit", context_settings=CONTEXT)
@click.option("--in", "in_spec", required=True, help="In-distribution calibration data. " + DATA_HELP)
@click.option("--score", "score_name", default="LLR>1", show_default=True,
              help="Score: L1, LK (needs --iw), L>k or LLR>k (also written L_gt2, LLR_gt2).")
@click.option("--tpr", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of the in-distribution data that must pass (its scores <= threshold).")
@click.option("--iw", default=1, show_default=True, type=click.IntRange(1), help="K for the LK score.")
@LIMIT_OPTION
@SEED_OPTION
@_output_option("--out", Path("threshold.json"), help="Threshold file for `ood check`.")
@click.pass_obj
@_job_options
def ood_fit(settings: Settings, in_spec, score_name, tpr, iw, limit, seed, out):
    """Calibrate a threshold: inputs scoring above it are flagged as out-of-distribution."""
    from .metrics import canonical_score, fit_threshold, flag, ood_scores, score_k

    seed = _seed(settings, seed)
    name = canonical_score(score_name)
    if name == "LK" and iw < 2:
        raise InputError("score LK needs --iw K with K >= 2")

    def run(client: BivaClient):
        k = score_k(name)
        if k is not None and not 0 <= k <= client.meta.n_layers:
            raise InputError(f"score {name}: k out of range, expected 0..{client.meta.n_layers}")
        table = _score_set(client, settings, in_spec, limit, seed, iw, () if k is None else (k,), "fit")
        return table, client.meta

    table, meta = _with_client(run, settings)
    scores = ood_scores(table)[name]
    threshold = fit_threshold(scores, tpr)
    doc = {"score": name, "threshold": threshold, "tpr": tpr, "iw": iw,
           "calibration": {"data": in_spec, "n": int(len(scores)), "limit": limit, "seed": seed,
                           "batch_size": settings.batch_size,
                           "accepted": float(1.0 - flag(scores, threshold).mean())},
           "model": {key: meta.to_dict()[key] for key in ("image_shape", "likelihood", "binarize", "n_layers",
                                                          "latent_dim", "groups")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    click.echo(f"score {name}: threshold {threshold:.4f} accepts {doc['calibration']['accepted']:.1%} of "
               f"{len(scores)} images of {in_spec}; wrote {out}")


def _read_threshold(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        from .metrics import canonical_score

        doc["score"] = canonical_score(doc["score"])
        doc["threshold"] = float(doc["threshold"])
        doc["iw"] = int(doc.get("iw", 1))
        return doc
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a threshold file written by `ood fit` ({type(e).__name__}: {e})") from None


@ood.command("check", context_settings=CONTEXT)
@click.option("--threshold", "threshold_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Threshold file written by `ood fit`.")
@click.option("--data", required=True, help=DATA_HELP)
@LIMIT_OPTION
@SEED_OPTION
@_output_option("--out", None, help="Per-image rows (.csv/.json/.jsonl) [default: CSV on stdout].")
@click.pass_obj
@_job_options
def ood_check(settings: Settings, threshold_file, data, limit, seed, out):
    """Flag each input whose score exceeds the threshold. Exit code 0 if none is flagged, 3 if any is."""
    from .metrics import flag, ood_scores, score_k
    from .output import RowWriter

    doc = _read_threshold(threshold_file)
    seed = _seed(settings, seed)
    name, threshold, k = doc["score"], doc["threshold"], score_k(doc["score"])

    def run(client: BivaClient):
        model = doc.get("model", {})
        for key in ("image_shape", "n_layers", "latent_dim", "groups"):
            if key in model and model[key] != client.meta.to_dict().get(key):
                raise InputError(f"{threshold_file} was fitted on a model with {key} = {model[key]}, the server's "
                                 f"model has {client.meta.to_dict().get(key)}")
        return _score_set(client, settings, data, limit, seed, doc["iw"], () if k is None else (k,), "check")

    table = _with_client(run, settings)
    scores = ood_scores(table)[name]
    flagged = flag(scores, threshold)
    rows = [{"index": i, "score": float(s), "flagged": int(f)} for i, (s, f) in enumerate(zip(scores, flagged))]
    if out is not None:
        with RowWriter(out, ["index", "score", "flagged"]) as w:
            w.write(rows)
    else:
        click.echo("index,score,flagged")
        for r in rows:
            click.echo(f"{r['index']},{r['score']:.6g},{r['flagged']}")
    _echo_err(f"{int(flagged.sum())} of {len(rows)} inputs flagged (score {name} > {threshold:.4f})"
              + (f"; wrote {out}" if out is not None else ""))
    if flagged.any():
        click.get_current_context().exit(EXIT_FLAGGED)


# ---- reconstruct / encode -------------------------------------------------------------------------

@main.command(context_settings=CONTEXT)
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--k", "k_list", default=None, help="Comma-separated k: redraw layers 1..k [default: 0..L].")
@click.option("--limit", default=8, show_default=True, type=click.IntRange(1), help="Inputs (rows of the grid).")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Temperature of the redrawn layers.")
@SEED_OPTION
@_output_option("--out", Path("reconstructions.png"),
                help="PNG grid: one row per input, the input first, then one column per k.")
@_output_option("--npy", None, help="Also save the grid's images (N, 1 + len(k), C, H, W) float32 here.")
@click.pass_obj
@_job_options
def reconstruct(settings: Settings, data, k_list, limit, temperature, seed, out, npy):
    """Encode, then regenerate the bottom k layers for each k (the paper's Figure 12)."""
    from .output import image_grid, save_png
    from .tasks import load_inputs, parse_k_list
    from .tasks import reconstruct as run_reconstruct

    seed = _seed(settings, seed)

    def run(client: BivaClient):
        L = client.meta.n_layers
        ks = parse_k_list(k_list if k_list is not None else ",".join(map(str, range(L + 1))), L)
        images = load_inputs(data, client.meta, limit)
        return run_reconstruct(client, images, ks, seed, settings.batch_size, temperature), ks

    stack, ks = _with_client(run, settings)
    grid = image_grid(stack)
    save_png(grid, out)
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
        return encode_images(client, images, seed, settings.batch_size, settings.concurrency, settings.progress), \
            client.meta

    enc, meta = _with_client(run, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, q_mu=enc.q_mu, q_log_std=enc.q_log_std, z=enc.z, kl=enc.kl, groups=np.array(meta.groups),
             seeds=image_seeds(len(enc.z), settings.batch_size, seed), image_shape=np.array(meta.image_shape),
             meta=meta.to_json())
    click.echo(f"wrote {out}: q_mu, q_log_std, z {enc.z.shape}, kl {enc.kl.shape}, groups {', '.join(meta.groups)}")


if __name__ == "__main__":
    main()
