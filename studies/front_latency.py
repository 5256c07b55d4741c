"""Study: what the HTTP and gRPC fronts add to a request.
Fed: issue 32 (about 1 ms per small request, 2% on a 64-image score).

What the fronts (serving/front.py for HTTP, serving/grpc_front.py for gRPC) add to a request: the same
requests, one client per server and protocol, keep-alive, to a server started as the user starts it (fronts +
supervisor) and to one started with --biva-direct (Triton's own endpoints), both up at once, the requests
alternating between them.

    python -m studies.front_latency --repo triton_models
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from biva_core.contract import SAMPLE, SCORE, T

from biva_bench.backends import sync_call
from biva_bench.loadgen import infer_inputs
from biva_bench.measure import time_calls


def _requests(meta) -> dict[str, tuple[str, dict[str, np.ndarray], list[str]]]:
    rng = np.random.default_rng(0)
    x = (rng.random((1, *meta.image_shape)) > 0.5).astype(np.float32)
    x64 = (rng.random((64, *meta.image_shape)) > 0.5).astype(np.float32)
    seed = np.array([1], np.int64)
    return {"sample n=1": (SAMPLE, {T.n: np.array([1], np.int64), T.seed: seed}, [T.images]),
            "score 1 image": (SCORE, {T.images: x, T.seed: seed}, [T.elbo]),
            "score 64 images": (SCORE, {T.images: x64, T.seed: seed}, [T.elbo])}


def _call(mod, client, model: str, arrays: dict[str, np.ndarray], outputs: list[str]):
    """One request, sent again at each call (the bench's request body and blocking infer)."""
    call = sync_call(client, mod, model, [infer_inputs(mod, arrays)], outputs)
    return lambda: call(0)


def _calls(servers: dict, protocols: tuple[str, ...], repo: Path, clients: list) -> dict[str, dict]:
    """{label: {"direct": fn, "front": fn}} for each protocol; the clients opened are appended to `clients`."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    from biva_core.contract import read_meta

    calls = {}
    for protocol in protocols:
        mod = thttp if protocol == "http" else tgrpc
        mine = {k: mod.InferenceServerClient(s.http_url if protocol == "http" else s.grpc_url)
                for k, s in servers.items()}
        clients += mine.values()
        calls[f"{protocol} health ready"] = {k: c.is_server_ready for k, c in mine.items()}
        for label, (model, arrays, outputs) in _requests(read_meta(repo)).items():
            calls[f"{protocol} {label}"] = {k: _call(mod, c, model, arrays, outputs) for k, c in mine.items()}
    return calls


def measure(repo: Path, reps: int, log_dir: Path, protocols: tuple[str, ...] = ("http", "grpc")
            ) -> dict[str, dict[str, list[float]]]:
    """{kind: {"direct": seconds, "front": seconds}}; both servers up, requests alternating between them, so a
    busy machine slows both alike."""
    from biva_serving.net import DIRECT_FLAG
    from biva_serving.process import start_server

    with start_server(repo, extra_args=[DIRECT_FLAG], log_path=log_dir / "direct.log") as direct, \
            start_server(repo, log_path=log_dir / "front.log") as front:
        clients: list = []
        try:
            calls = _calls({"direct": direct, "front": front}, protocols, repo, clients)
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
            for c in clients:
                c.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository written by biva-export.")
@click.option("--reps", default=200, show_default=True, help="Timed requests per kind and server (after 5 warm-up).")
@click.option("--protocol", "protocols", type=click.Choice(["http", "grpc"]), multiple=True,
              default=("http", "grpc"), show_default=True, help="Protocols to measure (repeat the option for both).")
def main(repo: Path, reps: int, protocols: tuple[str, ...]) -> None:
    with tempfile.TemporaryDirectory(prefix="biva-front-") as tmp:
        times = measure(repo, reps, Path(tmp), protocols)
    click.echo(f"one client per protocol and server, keep-alive, {reps} requests each, alternating (ms): "
               "direct p50 / p99 | front p50 / p99 | added p50")
    for label, pair in times.items():
        d, f = np.array(pair["direct"]) * 1e3, np.array(pair["front"]) * 1e3
        click.echo(f"  {label:21s} {np.median(d):7.2f} / {np.percentile(d, 99):7.2f} | {np.median(f):7.2f} / "
                   f"{np.percentile(f, 99):7.2f} | {np.median(f) - np.median(d):+6.2f}")


if __name__ == "__main__":
    main()
