"""What the HTTP front (serving/front.py) adds to a request: the same requests, one client per server,
keep-alive, to a server started as the user starts it (front + supervisor) and to one started with
--biva-direct (Triton's own HTTP endpoint), both up at once, the requests alternating between them.

    python -m biva_bench.front_latency --repo triton_models

gRPC does not pass the front (its admin protocols are restricted inside Triton), so it is not measured here.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from biva_export.contract import SAMPLE, SCORE, T

from .measure import time_calls


def _requests(meta) -> dict[str, tuple[str, dict[str, np.ndarray], list[str]]]:
    rng = np.random.default_rng(0)
    x = (rng.random((1, *meta.image_shape)) > 0.5).astype(np.float32)
    x64 = (rng.random((64, *meta.image_shape)) > 0.5).astype(np.float32)
    seed = np.array([1], np.int64)
    return {"sample n=1": (SAMPLE, {T.n: np.array([1], np.int64), T.seed: seed}, [T.images]),
            "score 1 image": (SCORE, {T.images: x, T.seed: seed}, [T.elbo]),
            "score 64 images": (SCORE, {T.images: x64, T.seed: seed}, [T.elbo])}


def _call(client, model: str, arrays: dict[str, np.ndarray], outputs: list[str]):
    import tritonclient.http as thttp

    ins = []
    for name, a in arrays.items():
        t = thttp.InferInput(name, list(a.shape), "FP32" if a.dtype == np.float32 else "INT64")
        t.set_data_from_numpy(a)
        ins.append(t)
    outs = [thttp.InferRequestedOutput(o, binary_data=True) for o in outputs]
    return lambda: client.infer(model, ins, outputs=outs)


def measure(repo: Path, reps: int, log_dir: Path) -> dict[str, dict[str, list[float]]]:
    """{kind: {"direct": seconds, "front": seconds}}; both servers up, requests alternating between them, so a
    busy machine slows both alike."""
    import tritonclient.http as thttp

    from biva_export.repository import read_meta
    from biva_serving.launcher import DIRECT_FLAG, start_server

    with start_server(repo, extra_args=[DIRECT_FLAG], log_path=log_dir / "direct.log") as direct, \
            start_server(repo, log_path=log_dir / "front.log") as front:
        clients = {"direct": thttp.InferenceServerClient(direct.http_url),
                   "front": thttp.InferenceServerClient(front.http_url)}
        try:
            calls = {"health ready": {k: c.is_server_ready for k, c in clients.items()}}
            for label, (model, arrays, outputs) in _requests(read_meta(repo)).items():
                calls[label] = {k: _call(c, model, arrays, outputs) for k, c in clients.items()}
            out = {}
            for label, pair in calls.items():
                out[label] = {k: [] for k in pair}
                for k, fn in pair.items():
                    time_calls(fn, 0, warmup=5)
                for _ in range(reps):
                    for k, fn in pair.items():
                        out[label][k] += time_calls(fn, 1, warmup=0)
            return out
        finally:
            for c in clients.values():
                c.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository written by biva-export.")
@click.option("--reps", default=200, show_default=True, help="Timed requests per kind and server (after 5 warm-up).")
def main(repo: Path, reps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="biva-front-") as tmp:
        times = measure(repo, reps, Path(tmp))
    click.echo(f"HTTP, one client, keep-alive, {reps} requests each, alternating (ms): direct p50 / p99 | "
               "front p50 / p99 | added p50")
    for label, pair in times.items():
        d, f = np.array(pair["direct"]) * 1e3, np.array(pair["front"]) * 1e3
        click.echo(f"  {label:16s} {np.median(d):7.2f} / {np.percentile(d, 99):7.2f} | {np.median(f):7.2f} / "
                   f"{np.percentile(f, 99):7.2f} | {np.median(f) - np.median(d):+6.2f}")


if __name__ == "__main__":
    main()
