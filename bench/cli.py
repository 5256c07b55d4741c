"""`biva-bench --ckpt model.pt`: PyTorch (eager and torch.compile) vs ONNX Runtime vs Triton (HTTP, gRPC), the API
sweep (the API models' requests through the fronts, as users send them, at 1 to 64 clients over gRPC and HTTP), the
graph sweep (batch-1 requests straight to a graph model, with and without dynamic batching), and the achieved
fraction of the machine's fp32 GEMM rate.

    biva-bench --ckpt models/default28.pt                  full run (the README's figures)
    biva-bench --ckpt models/default28.pt --quick          tiny sizes, seconds (what the tests run)
    biva-bench --ckpt models/ood28.pt --repo R --sweep api --cases sampler,ood_mode --backends ort,served
                                                           the API sweep and the in-process ceilings it is held to
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from biva_core.routing import AOTI_MIN_ROWS

from .config import (ALTERNATED, ALTERNATED_API, BACKENDS, CASES, EXTRA_BACKENDS, LOADS, ORT_LEVELS, PRESETS,
                     SMALL_TURN, SWEEPS)
from .triton import Variant, parse_layout


def _ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str | None, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in allowed]
    if bad:
        raise click.BadParameter(f"unknown {bad}; expected some of {', '.join(allowed)}")
    return names


def _layouts(text: str | None) -> tuple[Variant, ...]:
    try:
        return tuple(Variant(**parse_layout(x)) for x in (text or "").split(",") if x.strip())
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="BIVA checkpoint (copy it first if a training run may rewrite it).")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model repository exported from CKPT by biva-export (default: export into a temporary folder).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench_out"),
              show_default=True, help="Where bench.json, bench.md, the PNG plots and the server logs go.")
@click.option("--quick", is_flag=True, help="Tiny sizes and short windows: seconds, for smoke tests.")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads for PyTorch, ONNX Runtime and each Triton graph instance [all usable cores].")
@click.option("--batches", default=None, help="Images per request, comma-separated [full: 1,8,64,256].")
@click.option("--iw", type=int, default=None, help="Importance samples per image for scorer_iw [full: 1000].")
@click.option("--iw-batches", default=None, help="Images per request for scorer_iw [full: 1,8].")
@click.option("--concurrency", default=None, help="Clients in the sweeps, comma-separated [full: 1,4,16,64].")
@click.option("--sweep", "sweeps", default=None,
              help=f"Concurrency sweeps, some of {','.join(SWEEPS)} [both]: api, the API models through the fronts "
                   "(tritonserver as users start it); graph, batch-1 requests straight to the graph model "
                   "(--biva-direct).")
@click.option("--api-protocols", default=None, help="API sweep: protocols, some of grpc,http [both].")
@click.option("--api-client-procs", type=click.IntRange(0), default=None,
              help="API sweep: client processes, the clients spread over them as coroutines (0: one per client) [2].")
@click.option("--backends", default=None, help=f"Subset of {','.join(BACKENDS)} (the default), and "
              f"{','.join(EXTRA_BACKENDS)}.")
@click.option("--cases", default=None, help=f"Subset of {','.join(CASES)}.")
@click.option("--window-s", type=float, default=None, help="Measurement window in seconds [full: 2].")
@click.option("--max-windows", type=int, default=None, help="Give up on stability after this many windows [full: 10].")
@click.option("--ort-level", type=click.Choice(ORT_LEVELS), default="all", show_default=True,
              help="ONNX Runtime graph optimisation level in process.")
@click.option("--ort-saved-graph", is_flag=True,
              help="In process: optimise once, save the optimised graph and load it without re-optimising.")
@click.option("--instances", type=int, default=0, show_default=True,
              help="Instances per Triton graph model (0: as exported).")
@click.option("--instance-threads", type=int, default=0,
              help="ONNX Runtime intra-op threads per Triton graph instance (0: --threads).")
@click.option("--ort-spinning", type=click.Choice(["on", "off"]), default=None,
              help="Triton graph instances: idle ONNX Runtime threads busy-wait (on) or sleep (off) [as exported].")
@click.option("--layouts", default=None,
              help="Extra dynamic-batching sweeps, one server each: INSTANCESxTHREADS[:spin|:nospin], "
                   "comma-separated, e.g. 1x2:spin,1x2:nospin,2x1:nospin.")
@click.option("--layout-rounds", type=int, default=1, show_default=True,
              help="Run the --layouts list this many times over, interleaved; each layout reports its median round.")
@click.option("--load", type=click.Choice(LOADS), default="async", show_default=True,
              help="Sweep clients: coroutines of the bench process (async), or client processes (see --client-procs).")
@click.option("--client-procs", type=int, default=0, show_default=True,
              help="With --load processes: client processes, the clients spread over them as coroutines "
                   "(0: one process per client).")
@click.option("--neighbour", is_flag=True,
              help="With --load processes: during the sweeps, run a 1-thread GEMM loop beside the server and report its rate against its "
                   "rate beside an idle server (what the served model leaves to, say, a training process).")
@click.option("--queue-delay-us", type=int, default=None, help="Dynamic batcher max queue delay (default: as exported).")
@click.option("--preferred-batch", default=None,
              help="Dynamic batcher preferred batch sizes, comma-separated; '' for none (default: as exported).")
@click.option("--alternated-reps", type=click.IntRange(0), default=None,
              help=f"Rounds in which {' and '.join(ALTERNATED)} run in turn per case and batch (below "
                   f"{AOTI_MIN_ROWS} images, turns of {SMALL_TURN} calls after an untimed one), and "
                   f"{' and '.join(ALTERNATED_API)} from {AOTI_MIN_ROWS} images, when both are measured; their "
                   "ratios come from these [full: 21, quick: 3; 0: windows only].")
@click.option("--alternated-turn", type=click.IntRange(1), default=1, show_default=True,
              help="Calls in a row per backend in each alternated round.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, repo, out_dir, quick, threads, batches, iw, iw_batches, concurrency, sweeps, api_protocols,
         api_client_procs, backends, cases, window_s,
         max_windows, ort_level, ort_saved_graph, instances, instance_threads, ort_spinning, layouts, layout_rounds,
         load, client_procs, neighbour, queue_delay_us, preferred_batch, alternated_reps, alternated_turn, debug):
    """Benchmark the exported BIVA graphs: PyTorch eager and torch.compile, ONNX Runtime in process, Triton over
    HTTP and gRPC."""
    from biva_core.checkpoint import CheckpointError
    from biva_export.cli import one_line_errors

    from .run import BenchError, run_bench

    with one_line_errors(debug, BenchError, CheckpointError, ValueError):
        cfg = PRESETS["quick" if quick else "full"]
        measure = cfg.measure
        if window_s is not None:
            measure = replace(measure, window_s=window_s)
        if max_windows is not None:
            measure = replace(measure, max_windows=max_windows)
        overrides = {"batches": _ints(batches), "iw": iw, "iw_batches": _ints(iw_batches),
                     "concurrency": _ints(concurrency), "backends": _names(backends, BACKENDS + EXTRA_BACKENDS),
                     "cases": _names(cases, CASES), "threads": threads, "alternated_reps": alternated_reps,
                     "sweeps": _names(sweeps, SWEEPS), "api_protocols": _names(api_protocols, ("grpc", "http")),
                     "api_client_procs": api_client_procs}
        spinning = None if ort_spinning is None else ort_spinning == "on"
        cfg = replace(cfg, measure=measure, ort_level=ort_level, ort_saved_graph=ort_saved_graph, load=load,
                      client_procs=client_procs,
                      neighbour=neighbour,
                      variant=Variant(threads=instance_threads or threads or 0, instances=instances,
                                      preferred=_ints(preferred_batch), queue_delay_us=queue_delay_us,
                                      spinning=spinning),
                      layouts=_layouts(layouts), layout_rounds=layout_rounds, alternated_turn=alternated_turn,
                      **{k: v for k, v in overrides.items() if v is not None})
        run_bench(ckpt, out_dir, cfg, repo=repo, log=click.echo)


if __name__ == "__main__":
    main()
