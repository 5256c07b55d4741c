"""Study: importance-weighted rows on the scorer vs the encoder graph.
Fed: biva_score's IW route (scoring.iw_calls, IW_CALL_ROWS = 32).

Importance-weighted rows on the scorer vs the encoder graph: why biva_score runs samples 1..K-1 on the scorer.

    python -m studies.iw_rows --repo triton_models

K importance samples of one random binary image, the same noise, in ONNX Runtime, three ways:

    encoder      K rows (the image tiled) in calls of up to the graph's max batch: every sample through the whole
                 pass, biva_score's first route;
    encoder/32   the same rows in calls of IW_CALL_ROWS rows (what smaller calls alone give: the caches);
    scorer       the calls biva_score makes now (scoring.iw_calls): each image with up to IW_CALL_ROWS samples
                 per call, the stages that see x alone once per call.

Prints the largest log_w difference from the encoder's (all must agree), L_K of each, and the median seconds of
alternating runs (one warm-up first), in one process.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import click
import numpy as np


def _routes(sessions: dict, image: np.ndarray, noise: np.ndarray, graph_rows: int, call_rows: int
            ) -> dict[str, Callable[[], np.ndarray]]:
    """name -> a function giving log w of the K samples (K,), each route as described above."""
    from biva_core.contract import ENCODER, SCORER, T
    from biva_core.scoring import iw_calls

    K = noise.shape[0]
    images = np.repeat(image, K, axis=0)

    def encoder(rows: int) -> Callable[[], np.ndarray]:
        return lambda: np.concatenate([sessions[ENCODER].run([T.log_w], {
            T.images: images[s:s + rows], T.noise: noise[s:s + rows]})[0][:, 0] for s in range(0, K, rows)])

    def scorer() -> np.ndarray:  # the call holding sample 0 also runs its L^{>k} pass (k = 0), as biva_score's
        out = np.empty(K, np.float32)
        for _, smp in iw_calls(K, 1, call_rows):
            out[smp] = sessions[SCORER].run([T.log_w], {T.images: image, T.noise: noise[None, smp],
                                                        T.k: np.zeros((1, int(smp.start == 0)), np.int64)})[0][0]
        return out

    return {"encoder": encoder(graph_rows), f"encoder/{call_rows}": encoder(call_rows), "scorer": scorer}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository written by biva-export (with its model.onnx files).")
@click.option("--rows", default=1000, show_default=True, help="Importance samples K of one image.")
@click.option("--reps", default=4, show_default=True, help="Alternating timed runs per route (after one warm-up).")
@click.option("--threads", default=2, show_default=True, help="ONNX Runtime intra-op threads.")
@click.option("--call-rows", default=None, type=int, help="Rows per scorer call [scoring.IW_CALL_ROWS].")
def main(repo: Path, rows: int, reps: int, threads: int, call_rows: int | None) -> None:
    from biva_core.contract import ENCODER, SCORER
    from biva_core.runtimes import ort_session
    from biva_core.scoring import IW_CALL_ROWS, LogMeanExp
    from biva_core.contract import read_meta

    meta = read_meta(repo)
    call_rows = min(call_rows or IW_CALL_ROWS, meta.graph_max_batch)
    sessions = {g: ort_session(str(repo / g / "1" / "model.onnx"), threads) for g in (SCORER, ENCODER)}
    rng = np.random.default_rng(0)
    image = (rng.random((1, *meta.image_shape)) > 0.5).astype(np.float32)
    noise = rng.standard_normal((rows, meta.noise_dim), dtype=np.float32)
    routes = _routes(sessions, image, noise, meta.graph_max_batch, call_rows)
    log_w = {name: run() for name, run in routes.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(reps):
        for name, run in routes.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    for name, lw in log_w.items():
        lme = LogMeanExp(1)
        lme.add(lw[:, None])
        click.echo(f"{name:12s} L_K {float(lme.value()[0]):.4f} nats, max |log_w - encoder's| "
                   f"{float(np.abs(lw - log_w['encoder']).max()):.3g} nats, median {med[name]:.3f} s "
                   f"({med['encoder'] / med[name]:.2f}x the encoder's)")
    click.echo(f"{rows} IW samples of one image, ONNX Runtime {threads} threads, median of {reps} alternating runs; "
               f"scorer calls of {call_rows} rows")


if __name__ == "__main__":
    main()
