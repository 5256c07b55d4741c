"""End-to-end demo: checkpoint -> ONNX + Triton repository -> live server -> samples, likelihoods, OOD.

    python -m biva_demo.demo --ckpt models/ood28.pt [--out-dir demo_out] [--repo triton_models]

Exports the checkpoint (biva-export, with its fitted detector where it has one), starts tritonserver on free
loopback ports, then runs the library equivalents of

    biva-client sample --n 64 --out samples.png
    biva-client likelihood --data fashion-mnist:test --limit 500 --out likelihood.csv
    biva-client ood score --in fashion-mnist:test --ood mnist --limit 1000 --plot ood_mnist.png
    biva-client ood score --in fashion-mnist:test --ood digits --limit 1000 --plot ood_digits.png
    biva-client reconstruct --data fashion-mnist:test --limit 8 --out reconstructions.png

(OOD with the recommended estimator, mode, and the served detector biva_detect beside the single scores),
writes everything into --out-dir, prints where each output went, and stops the server (also on an error
or Ctrl-C).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from biva_client.api import EXIT_ERROR, EXIT_INTERRUPTED, BivaClient, ClientError
from biva_core.contract import OOD_ESTIMATOR
from biva_core.scoring import ScoreRequest


def _step(msg: str, t0: float) -> None:
    click.echo(f"[{time.monotonic() - t0:6.1f} s] {msg}")


@dataclass(frozen=True)
class DemoConfig:
    n_samples: int = 64  # images sampled from the prior
    ll_limit: int = 500  # images of in_spec scored for likelihoods
    ood_limit: int = 1000  # images per OOD set
    k_list: str | None = None  # k of the OOD scores L>k, LLR>k (None: 1..L-1)
    in_spec: str = "fashion-mnist:test"  # in-distribution data spec
    # out-of-distribution data specs: the paper's pair first (real MNIST), then scikit-learn's digits
    ood_specs: tuple[str, ...] = ("mnist", "digits")
    seed: int = 0  # base seed of every job
    batch_size: int = 100  # images per request
    concurrency: int = 2  # requests in flight
    progress: bool | None = None  # progress bars (None: only on a terminal)
    runtime: str = "aoti"  # the graphs' runtime (biva-export --runtime): the default route, or "onnxruntime"


def _export(ckpt: Path, repo: Path, runtime: str, t0: float) -> None:
    from biva_export.serving_config import ServingConfig
    from biva_export.pipeline import ExportConfig, run_export

    with tempfile.TemporaryDirectory(prefix="biva-demo-") as tmp:
        # a snapshot: the checkpoint may be rewritten by a training run while this runs
        snapshot = Path(tmp) / ckpt.name
        shutil.copyfile(ckpt, snapshot)
        _step(f"exporting {ckpt} to {repo} (ONNX graphs validated against PyTorch)", t0)
        run_export(snapshot, repo, ExportConfig(serving=ServingConfig(runtime=runtime)),
                   log=lambda msg: click.echo(f"    {msg}"), source=str(ckpt))


def _likelihood(client: BivaClient, cfg: DemoConfig, out_dir: Path, outputs: dict, t0: float):
    """Scores cfg.ll_limit images of cfg.in_spec; returns the images."""
    from biva_client.output import RowWriter
    from biva_client.tasks import (Job, likelihood_columns, likelihood_rows, likelihood_summary, load_inputs,
                                   score_images)

    meta = client.meta
    x = load_inputs(cfg.in_spec, meta, cfg.ll_limit)
    path = out_dir / "likelihood.csv"
    with RowWriter(path, likelihood_columns(1)) as w:
        table = score_images(client, x, Job(cfg.seed, cfg.batch_size, cfg.concurrency, cfg.progress),
                             ScoreRequest("sample", 1, 1, (), False),
                             lambda i, start, s: w.write(likelihood_rows(start, s, meta.n_dims, 1)), desc="bounds")
    summary = likelihood_summary(table, meta.n_dims)
    outputs["per-image likelihoods"] = path
    (out_dir / "likelihood_summary.json").write_text(json.dumps({"data": cfg.in_spec, **summary}, indent=2) + "\n")
    outputs["likelihood summary"] = out_dir / "likelihood_summary.json"
    l1, bpd = summary["L1_nats"], summary["L1_bpd"]
    _step(f"{cfg.in_spec}: L_1 = {l1['mean']:.2f} +- {l1['se']:.2f} nats ({bpd['mean']:.4f} bits/dim, "
          f"n = {l1['n']})", t0)
    return x


def _ood(client: BivaClient, cfg: DemoConfig, x, out_dir: Path, outputs: dict, t0: float) -> None:
    from biva_client.tasks import Job, detect_images, load_inputs, parse_k_list, score_images
    from biva_core.scoring import ScoreRequest
    from biva_core.plots import plot_ood
    from biva_core.stats import detection_table, format_table

    meta, job = client.meta, Job(cfg.seed, cfg.batch_size, cfg.concurrency, cfg.progress)
    req = ScoreRequest(OOD_ESTIMATOR, 1, 1, parse_k_list(cfg.k_list, meta.n_layers), want_iw=False)
    served = _has_detector(client)

    def scores(images, desc):
        out = score_images(client, images, job, req, desc=desc).scores()
        if served:
            out["detector"] = detect_images(client, images, job, desc=f"{desc} detect")[0]
        return out

    # the likelihood step's images when they are enough (same seeds, same numbers), else ood_limit fresh ones
    x_in = x[:cfg.ood_limit] if cfg.ood_limit <= len(x) else load_inputs(cfg.in_spec, meta, cfg.ood_limit)
    a = scores(x_in, "ood in")
    texts, sets = [], {}
    for spec in cfg.ood_specs:
        b = scores(load_inputs(spec, meta, cfg.ood_limit), f"ood {spec}")
        sets[spec] = detection_table(a, b)
        texts.append(f"in: {cfg.in_spec} ({len(x_in)})  OOD: {spec} ({len(b['L1'])})  estimator {req.estimator}\n"
                     f"{format_table(sets[spec])}")
        png = out_dir / f"ood_{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec).strip('_')}.png"  # ood_mnist.png
        outputs[f"OOD plot ({spec})"] = plot_ood(a, {spec: b}, png, cfg.in_spec)
    (out_dir / "ood_table.txt").write_text("\n\n".join(texts) + "\n")
    (out_dir / "ood_metrics.json").write_text(json.dumps({"in": cfg.in_spec, "ks": list(req.ks),
                                                         "estimator": req.estimator, "sets": sets}, indent=2) + "\n")
    outputs["OOD table"] = out_dir / "ood_table.txt"
    outputs["OOD metrics"] = out_dir / "ood_metrics.json"
    _step("OOD:\n" + "\n\n".join(texts), t0)


def _has_detector(client: BivaClient) -> bool:
    try:
        client.ensure_ready("detect")
        return True
    except ClientError:
        return False


def run_demo(ckpt: Path, out_dir: Path, repo: Path, cfg: DemoConfig = DemoConfig()) -> dict[str, Path]:
    """Export, serve, query; returns {what: path} of every output written."""
    from biva_client.output import image_grid, save_png
    from biva_client.tasks import reconstruct, sample_images
    from biva_core.plots import plot_grid
    from biva_serving.process import start_server

    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    _export(ckpt, repo, cfg.runtime, t0)
    outputs: dict[str, Path] = {"model repository": repo}
    _step("starting tritonserver", t0)
    server = start_server(repo, log_path=out_dir / "server.log")
    outputs["server log"] = out_dir / "server.log"
    client = BivaClient(server.http_url, "http")
    try:
        meta = client.meta
        _step(f"server ready at http://{server.http_url} (grpc {server.grpc_url}); model: image shape "
              f"{meta.image_shape}, L = {meta.n_layers} layers, latent dim {meta.latent_dim}", t0)
        images = sample_images(client, cfg.n_samples, cfg.seed)
        outputs["samples grid"] = save_png(image_grid(images), out_dir / "samples.png")
        _step(f"sampled {cfg.n_samples} images (seed {cfg.seed})", t0)
        x = _likelihood(client, cfg, out_dir, outputs, t0)
        _ood(client, cfg, x, out_dir, outputs, t0)
        rec = reconstruct(client, x[:8], range(meta.n_layers + 1), cfg.seed, cfg.batch_size)
        labels = ["input", *(f"k = {k}" for k in range(meta.n_layers + 1))]
        outputs["reconstructions"] = plot_grid(rec, labels, out_dir / "reconstructions.png")
        _step("reconstructions: one row per input, the input first, then k = 0..L", t0)
    finally:
        client.close()
        server.stop()
        _step("server stopped", t0)
    return outputs


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=Path("models/ood28.pt"), show_default=True, help="BIVA checkpoint to export and serve.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"),
              show_default=True, help="Where the PNGs, CSV, tables and the server log go.")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository to (re)write.")
@click.option("--ll-limit", default=500, show_default=True, type=click.IntRange(1),
              help="Images of fashion-mnist:test scored for likelihoods.")
@click.option("--ood-limit", default=1000, show_default=True, type=click.IntRange(1),
              help="Images per OOD set (the in-distribution set, MNIST with ood-limit/10 per class, digits).")
@click.option("--k", "k_list", default=None, help="k list of the OOD scores L>k, LLR>k [default: 1..L-1].")
@click.option("--runtime", type=click.Choice(["aoti", "onnxruntime"]), default="aoti", show_default=True,
              help="The graphs' runtime (biva-export --runtime): the default route, or ONNX Runtime alone (faster "
                   "to export).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, out_dir, repo, ll_limit, ood_limit, k_list, runtime, debug):
    """Export a checkpoint, serve it with Triton, and run samples, likelihoods, OOD scores and reconstructions."""
    t0 = time.monotonic()
    try:
        outputs = run_demo(ckpt, out_dir, repo, DemoConfig(ll_limit=ll_limit, ood_limit=ood_limit, k_list=k_list,
                                                           runtime=runtime))
    except KeyboardInterrupt:
        click.echo("interrupted (server stopped)", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001
        if debug:
            raise
        code = e.exit_code if isinstance(e, ClientError) else EXIT_ERROR
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"Error: {type(e).__name__}: {first}" if not isinstance(e, ClientError) else f"Error: {e}",
                   err=True)
        sys.exit(code)
    click.echo(f"done in {time.monotonic() - t0:.0f} s; outputs:")
    for what, path in outputs.items():
        click.echo(f"  {what:<22} {path}")


if __name__ == "__main__":
    main()
