"""Study: the served route against torch.compile at one batch, runtimes alternated.
Fed: docs/speed.md "Batch 64, measured alternately" (the slice package).

The served route against torch.compile at one batch, every runtime called alternately: what the slice package buys.

    python -m studies.route --ckpt models/ood28.pt --repo triton_models --rows 64 --json docs/route_amd.json

For each graph, on the same inputs (the scorer with one draw and one k, as the bench's scorer_k1): torch.compile
(static shapes, as biva-bench's compile backend), ONNX Runtime, the served route with the package for every batch
size alone, and the served route with full slices on the slice package (routing.SLICE_PACKAGE_FILE, what a
default export serves). One call of each in turn (or `--turn` calls in a row), `--reps` times after a warm-up,
`--threads` intra-op threads each; medians. Alternating makes the machine's drift (shared cores) slow every
runtime alike, so the ratios hold where windowed rates taken minutes apart do not (the full bench's batch-64 cells
moved by up to 25% between runs of the same code).
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from biva_core.contract import GRAPHS
from biva_core.routing import PACKAGE_FILE, SLICE_PACKAGE_FILE
from biva_core.runtimes import OrtOptions, cpu_info, ort_session

from biva_bench.backends import AotiRunner, CompiledRunner, OrtRunner, ServedRunner, alternated_medians


def route_rates(ckpt: Path, repo: Path, rows: int, reps: int, threads: int, turn: int = 1) -> dict:
    """{graph: {runtime: images/s, "served_over_compile": ratio, ...}} by alternated medians: each runtime in
    turn makes `turn` calls in a row (1: strictly alternated; more: closer to the bench's back-to-back windows)."""
    from biva_core.checkpoint import load_model
    from biva_export.graphs import GRAPH_MODULES, graph_specs, inference_copy
    from biva_export.onnx_export import example_inputs

    torch.set_num_threads(threads)
    model, _ = load_model(ckpt)
    plain = inference_copy(model)
    out: dict = {}
    for graph, spec in graph_specs(plain).items():
        here = repo / graph / "1"
        if not (here / SLICE_PACKAGE_FILE).is_file():
            raise click.ClickException(f"{here / SLICE_PACKAGE_FILE}: no slice package; export with biva-export "
                                       "(the default runtime)")
        ort = OrtRunner(ort_session(str(here / "model.onnx"), OrtOptions(threads=threads, spinning=False)))
        package = AotiRunner(here / PACKAGE_FILE, spec, threads)
        runners = {"compile": CompiledRunner(GRAPH_MODULES[graph](plain), spec), "onnxruntime": ort,
                   "served_one_package": ServedRunner(ort, package, None, threads),
                   "served": ServedRunner(ort, package, AotiRunner(here / SLICE_PACKAGE_FILE, spec, threads), threads)}
        feeds = example_inputs(spec, plain, rows, seed=rows)
        prepared = {k: r.prepare(feeds) for k, r in runners.items()}  # torch.compile compiles in its prepare
        seconds = alternated_medians({k: (lambda r=r, f=prepared[k]: r(f)) for k, r in runners.items()}, reps, turn)
        ips = {k: rows / v for k, v in seconds.items()}
        out[graph] = {**ips, **{f"{k}_over_compile": ips[k] / ips["compile"] for k in runners if k != "compile"}}
    return out


def packaged_repository(command):
    """The --ckpt and --repo options of the alternated measurements (this one and studies.crossover)."""
    command = click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path),
                           default=Path("triton_models"), show_default=True,
                           help="A repository exported with the AOTInductor packages (biva-export's default).")(command)
    return click.option("--ckpt", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                        default=Path("models/ood28.pt"), show_default=True,
                        help="The checkpoint the repository was exported from.")(command)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@packaged_repository
@click.option("--rows", default=64, show_default=True, help="Images per call.")
@click.option("--reps", default=21, show_default=True, help="Alternated calls per runtime.")
@click.option("--threads", default=2, show_default=True, help="Intra-op threads of every runtime.")
@click.option("--turn", default=1, show_default=True,
              help="Calls each runtime makes in a row before the next one's turn (1: strictly alternated).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON (with the processor's name).")
def main(ckpt: Path, repo: Path, rows: int, reps: int, threads: int, turn: int, json_out: Path | None) -> None:
    """Images/s of each runtime and its ratio to torch.compile per graph, measured alternately."""
    res = route_rates(ckpt, repo, rows, reps, threads, turn)
    cpu = cpu_info()[0]
    cols = ("compile", "onnxruntime", "served_one_package", "served")
    click.echo(f"{cpu}, {threads} threads, {rows} images a call: images/s (medians of {reps} turns of {turn} "
               "call(s) per runtime); the ratio to torch.compile in brackets")
    click.echo("| graph | " + " | ".join(cols) + " |")
    click.echo("|---" * (len(cols) + 1) + "|")
    for graph in GRAPHS:
        r = res[graph]
        click.echo(f"| {graph} | {r['compile']:.1f} | " + " | ".join(
            f"{r[c]:.1f} ({r[c + '_over_compile']:.2f})" for c in cols[1:]) + " |")
    if json_out:
        json_out.write_text(json.dumps({"cpu": cpu, "threads": threads, "rows": rows, "reps": reps, "turn": turn,
                                        "rates": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
