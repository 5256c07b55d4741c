"""What the HTTP front (serving/front.py) adds to a request: the same requests, one client, keep-alive, to a
server started as the user starts it (front + supervisor) and to one started with --biva-direct (Triton's
own HTTP endpoint), one server at a time.

    python -m biva_bench.front_latency --repo triton_models

gRPC does not pass the front (its admin protocols are restricted inside Triton), so it is not measured here.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from .measure import time_calls


def _requests(meta) -> dict[str, tuple[str, dict[str, np.ndarray], list[str]]]:
    rng = np.random.default_rng(0)
    x = (rng.random((1, *meta.image_shape)) > 0.5).astype(np.float32)
    x64 = (rng.random((64, *meta.image_shape)) > 0.5).astype(np.float32)
    seed = np.array([1], np.int64)
    return {"sample n=1": ("biva_sample", {"n": np.array([1], np.int64), "seed": seed}, ["images"]),
            "score 1 image": ("biva_score", {"images": x, "seed": seed}, ["elbo"]),
            "score 64 images": ("biva_score", {"images": x64, "seed": seed}, ["elbo"])}


def _time(client, model: str, arrays: dict[str, np.ndarray], outputs: list[str], reps: int) -> list[float]:
    import tritonclient.http as thttp

    ins = []
    for name, a in arrays.items():
        t = thttp.InferInput(name, list(a.shape), "FP32" if a.dtype == np.float32 else "INT64")
        t.set_data_from_numpy(a)
        ins.append(t)
    outs = [thttp.InferRequestedOutput(o, binary_data=True) for o in outputs]
    return time_calls(lambda: client.infer(model, ins, outputs=outs), reps, warmup=5)


def measure(repo: Path, direct: bool, reps: int, log_dir: Path) -> dict[str, list[float]]:
    import tritonclient.http as thttp

    from biva_export.repository import read_meta
    from biva_serving.launcher import DIRECT_FLAG, start_server

    extra = [DIRECT_FLAG] if direct else []
    out: dict[str, list[float]] = {}
    with start_server(repo, extra_args=extra, log_path=log_dir / f"server_{'direct' if direct else 'front'}.log") as s:
        client = thttp.InferenceServerClient(s.http_url)
        try:
            out["health ready"] = time_calls(client.is_server_ready, reps, warmup=5)
            for label, (model, arrays, outputs) in _requests(read_meta(repo)).items():
                out[label] = _time(client, model, arrays, outputs, reps)
        finally:
            client.close()
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository written by biva-export.")
@click.option("--reps", default=200, show_default=True, help="Timed requests per kind and server (after 5 warm-up).")
def main(repo: Path, reps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="biva-front-") as tmp:
        direct = measure(repo, True, reps, Path(tmp))
        front = measure(repo, False, reps, Path(tmp))
    click.echo(f"HTTP, one client, keep-alive, {reps} requests each (ms): direct p50 / p99 | front p50 / p99 | "
               "added p50")
    for label in direct:
        d, f = np.array(direct[label]) * 1e3, np.array(front[label]) * 1e3
        click.echo(f"  {label:16s} {np.median(d):7.2f} / {np.percentile(d, 99):7.2f} | {np.median(f):7.2f} / "
                   f"{np.percentile(f, 99):7.2f} | {np.median(f) - np.median(d):+6.2f}")


if __name__ == "__main__":
    main()
