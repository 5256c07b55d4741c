"""Study: the server's memory before, during and after a burst of large requests.
Fed: docs/speed.md (memory), the supervisor's recycle slack.

Memory of a served repository before, during and after a burst of large requests: the resident memory of the
server's whole process tree (launcher, Triton, every python-backend stub), summed from /proc.

    python -m studies.memory --ckpt models/ood28.pt [--repo triton_models] [--rounds 3]

The burst: `--rounds` times, biva_sample with n = max_n, biva_encode and biva_score with max_images images
(biva_score with iw as high as the request's row cap allows). "after" is read `--settle` seconds after the last
request (the supervisor recycles a model that holds more than its slack once it is idle: serving/supervisor.py).
Memory is the proportional set size (PSS) of the tree: pages Triton and a stub share are counted once. Prints one
JSON line: MB at baseline, the peak seen during the burst, after, after / baseline, and the resident sums too.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np


def tree_rss_mb(root_pid: int, field: str = "Rss") -> float:
    """Memory (MB) of `root_pid` and every process below it: resident ("Rss"), or proportional ("Pss": each
    shared page counted once over the processes that map it, as the stubs and Triton share their tensors)."""
    parents: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                parents[int(p)] = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {root_pid}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for p in tree:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def burst(client, rounds: int) -> None:
    """Large requests of every kind, `rounds` times."""
    from biva_core.scoring import ScoreRequest

    meta = client.meta
    caps = meta.caps
    x = (np.random.default_rng(0).random((caps.max_images, *meta.image_shape)) < 0.3).astype(np.float32)
    iw = max(1, min(caps.max_iw, caps.max_rows // caps.max_images - (meta.n_layers - 1)))
    for r in range(rounds):
        client.sample(caps.max_n, seed=r)
        client.encode(x, seed=r)
        client.score(x, seed=r, iw=iw, ks=tuple(range(1, meta.n_layers)), estimator=ScoreRequest().estimator)


def measure(repo: Path, rounds: int, settle: float = 20.0, log=print) -> dict:
    from biva_client.api import BivaClient
    from biva_serving.process import start_server

    with tempfile.TemporaryDirectory(prefix="biva-memory-") as tmp:
        with start_server(repo, log_path=Path(tmp) / "server.log") as server, \
                BivaClient(server.grpc_url, "grpc", timeout=900) as client:
            client.sample(4, seed=0)  # every model touched once: the baseline of a server that has served
            client.score(np.zeros((2, *client.meta.image_shape), np.float32), seed=0)
            time.sleep(2.0)
            pid = server.process.pid
            base, base_rss, peak = tree_rss_mb(pid, "Pss"), tree_rss_mb(pid), [0.0]
            stop = threading.Event()

            def watch() -> None:
                while not stop.wait(0.2):
                    peak[0] = max(peak[0], tree_rss_mb(pid, "Pss"))
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            t = time.monotonic()
            burst(client, rounds)
            stop.set()
            watcher.join()
            took = time.monotonic() - t
            time.sleep(settle)
            after, after_rss = tree_rss_mb(pid, "Pss"), tree_rss_mb(pid)
    out = {"baseline_pss_mb": round(base), "peak_pss_mb": round(max(peak[0], base)), "after_pss_mb": round(after),
           "after_over_baseline": round(after / base, 3), "baseline_rss_mb": round(base_rss),
           "after_rss_mb": round(after_rss), "burst_s": round(took, 1), "settle_s": settle, "rounds": rounds}
    log(json.dumps(out))
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=Path("models/ood28.pt"),
              show_default=True, help="Checkpoint, exported into a temporary repository unless --repo is given.")
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="An exported repository to serve instead.")
@click.option("--rounds", default=3, show_default=True, help="Bursts of large requests.")
@click.option("--settle", default=20.0, show_default=True, help="Seconds after the burst until 'after' is read.")
def main(ckpt, repo, rounds, settle):
    """Resident memory of the served process tree before, during and after a burst of large requests."""
    if repo is not None:
        measure(repo, rounds, settle, click.echo)
        return
    from biva_export.pipeline import run_export

    with tempfile.TemporaryDirectory(prefix="biva-memory-repo-") as tmp:
        run_export(ckpt, Path(tmp) / "repo", log=lambda *_: None, source=str(ckpt))
        measure(Path(tmp) / "repo", rounds, settle, click.echo)


if __name__ == "__main__":
    main()
