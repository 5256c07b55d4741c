"""The served route against torch.compile at one batch, every runtime called alternately: what the slice package buys.

    python -m biva_bench.route --ckpt models/ood28.pt --repo triton_models --rows 64 --json docs/route_amd.json

For each graph, on the same inputs (the scorer with one draw and one k, as the bench's scorer_k1): torch.compile
(static shapes, as biva-bench's compile backend), ONNX Runtime, the served route with the package for every batch
size alone, and the served route with full slices on the slice package (contract.SLICE_PACKAGE_FILE, what a
default export serves). One call of each in turn, `--reps` times after a warm-up, `--threads` intra-op threads
each; medians. Alternating makes the machine's drift (shared cores) slow every runtime alike, so the ratios hold
where windowed rates taken minutes apart do not (the full bench's batch-64 cells moved by up to 25% between runs
of the same code).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click
import torch

from biva_core.contract import GRAPHS, PACKAGE_FILE, SLICE_PACKAGE_FILE, OrtOptions, cpu_info, ort_session

from .backends import AotiRunner, CompiledRunner, OrtRunner, ServedRunner


def route_rates(ckpt: Path, repo: Path, rows: int, reps: int, threads: int) -> dict:
    """{graph: {runtime: images/s, "served_over_compile": ratio, ...}} by alternated medians."""
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
                   "served_one_package": ServedRunner(ort, package),
                   "served": ServedRunner(ort, package, AotiRunner(here / SLICE_PACKAGE_FILE, spec, threads))}
        feeds = example_inputs(spec, plain, rows, seed=rows)
        prepared = {k: r.prepare(feeds) for k, r in runners.items()}
        for name, r in runners.items():  # warm-up (torch.compile compiles in its prepare)
            r(prepared[name]), r(prepared[name])
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(reps):
            for name, r in runners.items():
                t = time.perf_counter()
                r(prepared[name])
                times[name].append(time.perf_counter() - t)
        ips = {k: rows / statistics.median(v) for k, v in times.items()}
        out[graph] = {**ips, **{f"{k}_over_compile": ips[k] / ips["compile"] for k in runners if k != "compile"}}
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=Path("models/ood28.pt"),
              show_default=True, help="The checkpoint the repository was exported from.")
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("triton_models"),
              show_default=True, help="A repository exported with the AOTInductor packages (biva-export's default).")
@click.option("--rows", default=64, show_default=True, help="Images per call.")
@click.option("--reps", default=21, show_default=True, help="Alternated calls per runtime.")
@click.option("--threads", default=2, show_default=True, help="Intra-op threads of every runtime.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON (with the processor's name).")
def main(ckpt: Path, repo: Path, rows: int, reps: int, threads: int, json_out: Path | None) -> None:
    """Images/s of each runtime and its ratio to torch.compile per graph, measured alternately."""
    res = route_rates(ckpt, repo, rows, reps, threads)
    cpu = cpu_info()[0]
    cols = ("compile", "onnxruntime", "served_one_package", "served")
    click.echo(f"{cpu}, {threads} threads, {rows} images a call: images/s (medians of {reps} alternated calls); "
               "the ratio to torch.compile in brackets")
    click.echo("| graph | " + " | ".join(cols) + " |")
    click.echo("|---" * (len(cols) + 1) + "|")
    for graph in GRAPHS:
        r = res[graph]
        click.echo(f"| {graph} | {r['compile']:.1f} | " + " | ".join(
            f"{r[c]:.1f} ({r[c + '_over_compile']:.2f})" for c in cols[1:]) + " |")
    if json_out:
        json_out.write_text(json.dumps({"cpu": cpu, "threads": threads, "rows": rows, "reps": reps, "rates": res},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
