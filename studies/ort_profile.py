"""Study: ONNX Runtime's kernel time per operator type.
Fed: docs/speed_history.md (the torch.compile gap), export/graph_passes.py's ELU form.

Where ONNX Runtime spends a graph's time: its own profiler, summed per operator type.

    python -m studies.ort_profile --ckpt models/default28.pt --repo triton_models --graph biva_graph_encoder --batch 64

Runs the served model.onnx in process (the optimisation level the server uses, `threads` intra-op threads)
on the bench's inputs, a few times after one warm-up, and prints each operator type's share of the kernel
time, milliseconds per run and nodes per run. The README's account of the torch.compile gap comes from it.
"""
from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import click
import numpy as np

from biva_core.contract import ENCODER


def op_times(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int) -> tuple[dict[str, float], dict[str, int]]:
    """{op type: kernel microseconds per run}, {op type: nodes run per run}, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    from biva_core.runtimes import ORT_LEVELS

    with tempfile.TemporaryDirectory(prefix="biva-ortprof-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS["all"])
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_timed = runs_seen[1]["ts"] if len(runs_seen) > 1 else 0  # skip the first run: memory planning
    micros: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_timed:
            micros[e["args"]["op_name"]] += e["dur"] / runs
            nodes[e["args"]["op_name"]] += 1
    return dict(micros), {k: v // runs for k, v in nodes.items()}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=Path("models/default28.pt"), show_default=True,
              help="The checkpoint the repository was exported from (for the inputs' shapes and binarisation).")
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository written by biva-export (with its model.onnx files).")
@click.option("--graph", default=ENCODER, show_default=True, help="Graph model to profile.")
@click.option("--batch", default=64, show_default=True, help="Rows per run.")
@click.option("--runs", default=5, show_default=True, help="Profiled runs (after one warm-up).")
@click.option("--threads", default=1, show_default=True, help="ONNX Runtime intra-op threads.")
@click.option("--top", default=12, show_default=True, help="Operator types listed.")
def main(ckpt: Path, repo: Path, graph: str, batch: int, runs: int, threads: int, top: int) -> None:
    from biva_core.checkpoint import load_model
    from biva_export.graphs import graph_specs, inference_copy
    from biva_export.onnx_export import example_inputs

    plain = inference_copy(load_model(ckpt)[0])
    specs = graph_specs(plain)
    if graph not in specs:
        raise click.BadParameter(f"{graph!r} is not a graph model; expected one of {sorted(specs)}", param_hint="--graph")
    feeds = example_inputs(specs[graph], plain, batch, seed=0)
    micros, nodes = op_times(repo / graph / "1" / "model.onnx", feeds, threads, runs)
    total = sum(micros.values())
    click.echo(f"{graph}, batch {batch}, {threads} thread(s), ONNX Runtime level all, mean of {runs} runs: "
               f"{total / 1e3:.1f} ms of kernel time per run")
    for op, us in sorted(micros.items(), key=lambda kv: -kv[1])[:top]:
        click.echo(f"  {op:16s} {100 * us / total:5.1f}%  {us / 1e3:8.2f} ms  {nodes[op]:4d} nodes")


if __name__ == "__main__":
    main()
