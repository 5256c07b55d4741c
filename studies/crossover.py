"""Study: where the AOTInductor package overtakes ONNX Runtime per row count.
Fed: routing.AOTI_MIN_ROWS = 8, docs/speed.md "The row threshold".

Where the AOTInductor package overtakes ONNX Runtime: the row threshold of the served route.

    python -m studies.crossover --ckpt models/ood28.pt --repo triton_models --json docs/crossover.json

For each graph and row count, the repository's ONNX graph (ONNX Runtime) and its AOTInductor package are called on
the same inputs alternately, call by call, `--reps` times after a warm-up, with `--threads` intra-op threads each;
the ratio package / ONNX Runtime of the median images/s is reported. Alternating makes a machine whose speed drifts
(shared cores) slow both runtimes alike, so the ratio holds where absolute rates from separate windows do not. The
package is called whole (no slicing), as the graph model calls it for one slice. routing.AOTI_MIN_ROWS is set from
these ratios.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from biva_core.contract import GRAPHS
from biva_core.routing import PACKAGE_FILE
from biva_core.runtimes import OrtOptions, aoti_runner, cpu_info, ort_session

from biva_bench.backends import alternated_medians
from .route import packaged_repository


def crossover(ckpt: Path, repo: Path, rows: tuple[int, ...], reps: int, threads: int) -> dict:
    """{graph: {rows: {"ort": images/s, "aoti": images/s, "aoti_over_ort": ratio}}} by alternated medians."""
    from biva_core.checkpoint import load_model
    from biva_export.graphs import graph_specs
    from biva_export.onnx_export import example_inputs

    torch.set_num_threads(threads)
    model, _ = load_model(ckpt)
    out: dict = {}
    for graph, spec in graph_specs(model).items():
        session = ort_session(str(repo / graph / "1" / "model.onnx"), OrtOptions(threads=threads, spinning=False))
        package = aoti_runner(str(repo / graph / "1" / PACKAGE_FILE), threads)
        out[graph] = {}
        for r in rows:
            feeds = example_inputs(spec, model, r, seed=r)
            ordered = [feeds[n] for n in spec.input_names]
            runs = {"ort": lambda: session.run(None, feeds), "aoti": lambda: package(*ordered)}
            ips = {k: r / v for k, v in alternated_medians(runs, reps).items()}
            out[graph][r] = {**ips, "aoti_over_ort": ips["aoti"] / ips["ort"]}
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@packaged_repository
@click.option("--rows", default="1,2,4,8,16,32,64", show_default=True, help="Rows per call, comma-separated.")
@click.option("--reps", default=15, show_default=True, help="Alternated calls per runtime and row count.")
@click.option("--threads", default=2, show_default=True, help="Intra-op threads of both runtimes.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON (with the processor's name).")
def main(ckpt: Path, repo: Path, rows: str, reps: int, threads: int, json_out: Path | None) -> None:
    """Package / ONNX Runtime images/s per graph and row count, measured alternately."""
    counts = tuple(int(r) for r in rows.split(","))
    res = crossover(ckpt, repo, counts, reps, threads)
    cpu = cpu_info()[0]
    click.echo(f"{cpu}, {threads} threads: AOTInductor package / ONNX Runtime images/s (medians of {reps} alternated "
               "calls)")
    click.echo("| graph | " + " | ".join(f"{r} rows" for r in counts) + " |")
    click.echo("|---" * (len(counts) + 1) + "|")
    for graph in GRAPHS:
        click.echo(f"| {graph} | " + " | ".join(f"{res[graph][r]['aoti_over_ort']:.2f}" for r in counts) + " |")
    if json_out:
        json_out.write_text(json.dumps({"cpu": cpu, "threads": threads, "reps": reps, "ratios": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
