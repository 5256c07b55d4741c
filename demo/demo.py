"""End-to-end demo: checkpoint -> ONNX + Triton repository -> live server -> samples, likelihoods, OOD.

    python -m biva_demo.demo --ckpt models/default28.pt [--out-dir demo_out] [--repo triton_models]

Exports the checkpoint (biva-export), starts tritonserver on free loopback ports, then runs the library
equivalents of

    biva-client sample --n 64 --out samples.png --npy samples.npy
    biva-client likelihood --data fashion-mnist:test --limit 500 --out likelihood.csv
    biva-client ood score --in fashion-mnist:test --ood digits --limit 1000 --k 1,2,3,4 --plot ood.png
    biva-client reconstruct --data fashion-mnist:test --limit 8 --out reconstructions.png

writes everything into --out-dir, prints where each output went, and stops the server (also on an error
or Ctrl-C). Measured: 60-80 s on 2 CPU cores for models/default28.pt (with a training run beside it).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

from biva_client.api import EXIT_ERROR, EXIT_INTERRUPTED, BivaClient, ClientError


def _step(msg: str, t0: float) -> None:
    click.echo(f"[{time.monotonic() - t0:6.1f} s] {msg}")


def run_demo(ckpt: Path, out_dir: Path, repo: Path, n_samples: int = 64, ll_limit: int = 500,
             ood_limit: int = 1000, k_list: str | None = "1,2,3,4", in_spec: str = "fashion-mnist:test",
             ood_spec: str = "digits", seed: int = 0, batch_size: int = 100, concurrency: int = 2,
             progress: bool | None = None) -> dict[str, Path]:
    """Export, serve, query; returns {what: path} of every output written."""
    from biva_export.pipeline import run_export
    from biva_serving.launcher import start_server

    from biva_client.metrics import format_table, ood_scores, ood_table
    from biva_client.output import RowWriter, image_grid, plot_ood, save_png
    from biva_client.tasks import (likelihood_columns, likelihood_rows, likelihood_summary, load_inputs, parse_k_list,
                        reconstruct, sample_images, score_images)

    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="biva-demo-") as tmp:
        # a snapshot: the checkpoint may be rewritten by a training run while this runs
        snapshot = Path(tmp) / ckpt.name
        shutil.copyfile(ckpt, snapshot)
        _step(f"exporting {ckpt} to {repo} (ONNX graphs validated against PyTorch)", t0)
        run_export(snapshot, repo, log=lambda msg: click.echo(f"    {msg}"), source=str(ckpt))
    outputs["model repository"] = repo
    _step("starting tritonserver", t0)
    server = start_server(repo, log_path=out_dir / "server.log")
    outputs["server log"] = out_dir / "server.log"
    client = BivaClient(server.http_url, "http")
    try:
        meta = client.meta
        _step(f"server ready at http://{server.http_url} (grpc {server.grpc_url}); model: image shape "
              f"{meta.image_shape}, L = {meta.n_layers} layers, latent dim {meta.latent_dim}", t0)

        images = sample_images(client, n_samples, seed)
        outputs["samples grid"] = save_png(image_grid(images), out_dir / "samples.png")
        _step(f"sampled {n_samples} images (seed {seed})", t0)

        x = load_inputs(in_spec, meta, ll_limit)
        path = out_dir / "likelihood.csv"
        with RowWriter(path, likelihood_columns(1)) as w:
            table = score_images(client, x, seed, batch_size, concurrency, 1, (),
                                 lambda i, start, s: w.write(likelihood_rows(start, s, meta.n_dims, 1)),
                                 progress, desc="likelihood")
        summary = likelihood_summary(table, meta.n_dims)
        outputs["per-image likelihoods"] = path
        (out_dir / "likelihood_summary.json").write_text(json.dumps({"data": in_spec, **summary}, indent=2) + "\n")
        outputs["likelihood summary"] = out_dir / "likelihood_summary.json"
        l1, bpd = summary["L1_nats"], summary["L1_bpd"]
        _step(f"{in_spec}: L_1 = {l1['mean']:.2f} +- {l1['se']:.2f} nats ({bpd['mean']:.4f} bits/dim, "
              f"n = {l1['n']})", t0)

        ks = parse_k_list(k_list, meta.n_layers)
        # the likelihood step's images when they are enough (same seeds, same numbers), else ood_limit fresh ones
        x_in = x[:ood_limit] if ood_limit <= len(x) else load_inputs(in_spec, meta, ood_limit)
        a = score_images(client, x_in, seed, batch_size, concurrency, 1, ks, progress=progress, desc="ood in")
        b = score_images(client, load_inputs(ood_spec, meta, ood_limit), seed, batch_size, concurrency, 1, ks,
                         progress=progress, desc="ood")
        metrics = ood_table(a, b)
        text = format_table(metrics)
        (out_dir / "ood_table.txt").write_text(f"in: {in_spec} ({len(a.elbo)})  OOD: {ood_spec} ({len(b.elbo)})\n"
                                               + text + "\n")
        (out_dir / "ood_metrics.json").write_text(json.dumps({"in": in_spec, "ood": ood_spec, "ks": list(ks),
                                                              "metrics": metrics}, indent=2) + "\n")
        outputs["OOD table"] = out_dir / "ood_table.txt"
        outputs["OOD metrics"] = out_dir / "ood_metrics.json"
        outputs["OOD plot"] = plot_ood(ood_scores(a), ood_scores(b), out_dir / "ood.png", in_spec, ood_spec)
        _step(f"OOD {in_spec} vs {ood_spec}:\n{text}", t0)

        rec = reconstruct(client, x[:8], range(meta.n_layers + 1), seed, batch_size)
        outputs["reconstructions"] = save_png(image_grid(rec), out_dir / "reconstructions.png")
        _step("reconstructions: one row per input, the input first, then k = 0..L", t0)
    finally:
        client.close()
        server.stop()
        _step("server stopped", t0)
    return outputs


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=Path("models/default28.pt"), show_default=True, help="BIVA checkpoint to export and serve.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"),
              show_default=True, help="Where the PNGs, CSV, tables and the server log go.")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository to (re)write.")
@click.option("--ll-limit", default=500, show_default=True, type=click.IntRange(1),
              help="Images of fashion-mnist:test scored for likelihoods.")
@click.option("--ood-limit", default=1000, show_default=True, type=click.IntRange(1), help="Images per OOD set.")
@click.option("--k", "k_list", default="1,2,3,4", show_default=True, help="k list of the OOD scores L>k, LLR>k.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, out_dir, repo, ll_limit, ood_limit, k_list, debug):
    """Export a checkpoint, serve it with Triton, and run samples, likelihoods, OOD scores and reconstructions."""
    t0 = time.monotonic()
    try:
        outputs = run_demo(ckpt, out_dir, repo, ll_limit=ll_limit, ood_limit=ood_limit, k_list=k_list)
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
