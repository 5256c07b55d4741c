"""Importance-weighted rows on the scorer vs the encoder graph: why biva_score sends samples 1..K-1 to the encoder.

    python -m biva_bench.iw_rows --repo triton_models

The scorer runs two top-down passes per row (the second for L^{>k}); the encoder's log_w output needs one.
Both graphs get the same K rows of one random binary image (k = 0 for the scorer) in ONNX Runtime; prints the
largest log_w difference (the two must agree) and the median seconds of alternating runs, in one process.
"""
from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository written by biva-export (with its model.onnx files).")
@click.option("--rows", default=1000, show_default=True, help="Importance samples K (rows of one image).")
@click.option("--reps", default=4, show_default=True, help="Alternating timed runs per graph (after one warm-up).")
@click.option("--threads", default=2, show_default=True, help="ONNX Runtime intra-op threads.")
def main(repo: Path, rows: int, reps: int, threads: int) -> None:
    from biva_export.contract import ENCODER, SCORER, T, ort_session
    from biva_export.repository import read_meta

    meta = read_meta(repo)
    sessions = {g: ort_session(str(repo / g / "1" / "model.onnx"), threads) for g in (SCORER, ENCODER)}
    rng = np.random.default_rng(0)
    image = (rng.random((1, *meta.image_shape)) > 0.5).astype(np.float32)
    feeds = {ENCODER: {T.images: np.repeat(image, rows, axis=0),
                       T.noise: rng.standard_normal((rows, meta.noise_dim), dtype=np.float32)}}
    feeds[SCORER] = {**feeds[ENCODER], T.k: np.zeros((rows, 1), np.int64)}
    log_w = {g: s.run([T.log_w], feeds[g])[0] for g, s in sessions.items()}  # also the warm-up
    times: dict[str, list[float]] = {g: [] for g in sessions}
    for _ in range(reps):
        for g, s in sessions.items():
            t0 = time.perf_counter()
            s.run([T.log_w], feeds[g])
            times[g].append(time.perf_counter() - t0)
    med = {g: float(np.median(t)) for g, t in times.items()}
    click.echo(f"max |log_w scorer - log_w encoder| over {rows} rows: "
               f"{float(np.abs(log_w[SCORER] - log_w[ENCODER]).max()):.3g} nats")
    click.echo(f"{rows} IW rows, ONNX Runtime {threads} threads, median of {reps}: scorer {med[SCORER]:.2f} s, "
               f"encoder {med[ENCODER]:.2f} s, scorer/encoder {med[SCORER] / med[ENCODER]:.2f}x")


if __name__ == "__main__":
    main()
