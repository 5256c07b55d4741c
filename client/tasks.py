"""Data-set level jobs over a `BivaClient`: load inputs, split them into requests, send them concurrently.

Seeds. The server draws each request's noise from the request's seed, so a job that splits its inputs
into batches gives batch i (the images [i * batch_size, (i + 1) * batch_size)) the seed base_seed + i.
The same base seed, batch size and inputs give the same numbers, and biva-eval / PyTorch reproduce them
with `evaluate_bounds(model, x_i, NoiseStream(base_seed + i), ...)`. `sample_images` does the same with
chunks of at most the server's max_n samples (one chunk, seed base_seed, when n <= max_n).
"""
from __future__ import annotations

import math
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from biva_export.contract import T

from .api import BivaClient, Encoding, InputError, ModelMeta, Scores, check_score_request, check_seed

BatchCallback = Callable[[int, int, Scores], None]  # (batch index, first image index, scores)


# ---- inputs ---------------------------------------------------------------------------------------

def load_inputs(spec: str, meta: ModelMeta, limit: int | None = None) -> np.ndarray:
    """Images from a data spec (biva_core.data syntax), checked against the model and preprocessed as
    its test set was (binary models: binarised the checkpoint's way). InputError, one line, otherwise."""
    from biva_core.data import load_for_model

    try:
        images = load_for_model(spec, meta.data_meta(), limit)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if msg.startswith("expected images of shape"):
            msg = f"{spec} does not fit the served model: {msg}"
        raise InputError(msg) from None
    if len(images) == 0:
        raise InputError(f"{spec}: no images")
    return images


def parse_k_list(text: str | None, n_layers: int) -> tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3) (sorted, duplicates dropped); None or '' -> 1..L-1 (the informative k)."""
    if text is None or not text.strip():
        return tuple(range(1, n_layers))
    try:
        ks = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise InputError(f"k: expected a comma-separated list of integers, got {text!r}") from None
    bad = [k for k in ks if not 0 <= k <= n_layers]
    if bad:
        raise InputError(f"k: {bad} out of range, expected values in 0..{n_layers} (L = {n_layers})")
    return tuple(ks)


def batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] covering range(n) in order."""
    if batch_size < 1:
        raise InputError(f"batch size: expected >= 1, got {batch_size}")
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def batch_seed(base_seed: int, i: int) -> int:
    return check_seed(base_seed + i, f"seed of batch {i} (base seed {base_seed} + {i})")


def image_seeds(n: int, batch_size: int, base_seed: int) -> np.ndarray:
    """(n,) int64: the seed of the request each image is sent in."""
    return base_seed + np.arange(n, dtype=np.int64) // batch_size


# ---- concurrency ----------------------------------------------------------------------------------

def imap_unordered(fn: Callable[[int], object], n: int, concurrency: int) -> Iterator[tuple[int, object]]:
    """Yield (i, fn(i)) for i in range(n) as they finish, at most `concurrency` at a time.

    Workers are daemon threads: on an error or Ctrl-C in the caller no new call starts and the process
    can exit without waiting for the calls in flight. The first exception is re-raised here.
    """
    if concurrency <= 1 or n <= 1:
        for i in range(n):
            yield i, fn(i)
        return
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n):
        todo.put(i)
    done: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, fn(i), None))
            except BaseException as e:  # handed to the caller's thread
                done.put((i, None, e))

    for _ in range(min(concurrency, n)):
        threading.Thread(target=worker, daemon=True, name="biva-client-worker").start()
    try:
        for _ in range(n):
            while True:
                try:
                    i, result, err = done.get(timeout=0.2)  # short waits keep Ctrl-C responsive
                    break
                except queue.Empty:
                    continue
            if err is not None:
                raise err
            yield i, result
    finally:
        stop.set()


def _progress(total: int, desc: str, show: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None if show is None else not show, file=sys.stderr,
                dynamic_ncols=True, leave=True)


# ---- jobs -----------------------------------------------------------------------------------------

def sample_images(client: BivaClient, n: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """n samples (n, C, H, W). Above the server cap max_n, chunk j of max_n samples uses seed + j."""
    if n < 1:
        raise InputError(f"n: expected >= 1, got {n}")
    check_seed(seed)
    cap = client.meta.caps.max_n
    parts = [client.sample(stop - start, batch_seed(seed, j), temperature)
             for j, (start, stop) in enumerate(batches(n, cap))]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


@dataclass
class ScoreTable:
    """Per-image bounds in nats over a whole data set, in input order."""

    elbo: np.ndarray  # (N,) L_1
    iw_bound: np.ndarray  # (N,) L_K
    l_gt_k: np.ndarray  # (N, len(ks)) L^{>k}
    kl: np.ndarray  # (N, G)
    ks: tuple[int, ...]
    iw: int
    seeds: np.ndarray  # (N,) the seed of the request each image was scored in

    def l_gt(self, k: int) -> np.ndarray:
        return self.l_gt_k[:, self.ks.index(k)]

    def llr(self, k: int) -> np.ndarray:
        """LLR^{>k} = L_1 - L^{>k} (Havtorn et al., 2021)."""
        return self.elbo - self.l_gt(k)


def check_batch_size(meta: ModelMeta, batch_size: int, iw: int = 1, ks: Sequence[int] = ()) -> None:
    """Refuse a job whose requests the server would refuse, before anything is sent."""
    cap = meta.caps.max_images
    if not 1 <= batch_size <= cap:
        raise InputError(f"batch size: expected 1..{cap} (server cap max_images), got {batch_size}")
    check_score_request(meta, batch_size, iw, ks)


@dataclass(frozen=True)
class Job:
    """How a data-set job is split into requests and sent."""

    seed: int = 0  # base seed: batch i is sent with seed + i
    batch_size: int = 100  # images per request
    concurrency: int = 1  # requests in flight at once
    progress: bool | None = False  # progress bar: True, False, or None (only on a terminal)


def score_images(client: BivaClient, images: np.ndarray, job: Job = Job(), iw: int = 1, ks: Sequence[int] = (),
                 on_batch: BatchCallback | None = None, desc: str = "score") -> ScoreTable:
    """Score every image; batch i is one request with seed `job.seed + i`.

    `on_batch(i, start, scores)` is called in batch order (a finished batch waits for the ones before it),
    so a caller can write rows incrementally and in input order.
    """
    seed, batch_size, concurrency, progress = job.seed, job.batch_size, job.concurrency, job.progress
    ks = tuple(int(k) for k in ks)
    client.check_images(images[:1])
    check_batch_size(client.meta, min(batch_size, len(images)), iw, ks)
    spans = batches(len(images), batch_size)
    seeds = [batch_seed(seed, i) for i in range(len(spans))]
    results: list[Scores | None] = [None] * len(spans)
    next_i = 0
    with _progress(len(images), desc, progress) as bar:
        for i, res in imap_unordered(lambda i: client.score(images[slice(*spans[i])], seeds[i], iw, ks),
                                     len(spans), concurrency):
            results[i] = res
            bar.update(spans[i][1] - spans[i][0])
            while next_i < len(spans) and results[next_i] is not None:
                if on_batch is not None:
                    on_batch(next_i, spans[next_i][0], results[next_i])
                next_i += 1
    cat = lambda name: np.concatenate([getattr(r, name) for r in results])  # noqa: E731
    return ScoreTable(cat(T.elbo), cat(T.iw_bound), cat(T.l_gt_k), cat(T.kl), ks, iw,
                      image_seeds(len(images), batch_size, seed))


def encode_images(client: BivaClient, images: np.ndarray, seed: int = 0, batch_size: int = 100,
                  concurrency: int = 1, progress: bool | None = False) -> Encoding:
    """biva_encode over a data set; batch i uses seed `seed + i`. Encoding.seed is the base seed."""
    client.check_images(images[:1])
    check_batch_size(client.meta, min(batch_size, len(images)))
    spans = batches(len(images), batch_size)
    results: list[Encoding | None] = [None] * len(spans)
    with _progress(len(images), "encode", progress) as bar:
        for i, res in imap_unordered(lambda i: client.encode(images[slice(*spans[i])], batch_seed(seed, i)),
                                     len(spans), concurrency):
            results[i] = res
            bar.update(spans[i][1] - spans[i][0])
    cat = lambda name: np.concatenate([getattr(r, name) for r in results])  # noqa: E731
    return Encoding(cat(T.z), cat(T.q_mu), cat(T.q_log_std), cat(T.kl), seed)


def regenerate_latents(client: BivaClient, z: np.ndarray, k: int, seed: int = 0, batch_size: int = 100,
                       temperature: float = 1.0) -> np.ndarray:
    """biva_regenerate over many latents; batch i uses seed `seed + i`."""
    check_batch_size(client.meta, min(batch_size, len(z)))
    parts = [client.regenerate(z[a:b], k, batch_seed(seed, i), temperature)
             for i, (a, b) in enumerate(batches(len(z), batch_size))]
    return np.concatenate(parts)


def reconstruct(client: BivaClient, images: np.ndarray, ks: Iterable[int], seed: int = 0, batch_size: int = 100,
                temperature: float = 1.0) -> np.ndarray:
    """Figure 12: encode, then redraw the bottom k layers for each k. Returns (N, 1 + len(ks), C, H, W),
    the input first. Encoding batch i and every regeneration of batch i use seed `seed + i`."""
    enc = encode_images(client, images, seed, batch_size)
    cols = [images] + [regenerate_latents(client, enc.z, k, seed, batch_size, temperature) for k in ks]
    return np.stack(cols, axis=1)  # (N, 1 + len(ks), C, H, W)


# ---- summaries ------------------------------------------------------------------------------------

def bits_per_dim(nats: np.ndarray | float, n_dims: int) -> np.ndarray | float:
    """-L / (C H W log 2), as biva_core.objectives.bits_per_dim (kept here so the client needs no torch)."""
    return -np.asarray(nats, dtype=np.float64) / (n_dims * math.log(2.0))


def mean_se(v: np.ndarray) -> dict[str, float]:
    """Mean, standard error of the mean (ddof 1) and count."""
    v = np.asarray(v, dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def likelihood_summary(table: ScoreTable, n_dims: int) -> dict[str, dict[str, float]]:
    """{"L1_nats": {mean, se, n}, "L1_bpd": ..., and "LK_*" with iw > 1, "KL_nats"}."""
    out = {"L1_nats": mean_se(table.elbo), "L1_bpd": mean_se(bits_per_dim(table.elbo, n_dims))}
    if table.iw > 1:
        out["LK_nats"] = mean_se(table.iw_bound)
        out["LK_bpd"] = mean_se(bits_per_dim(table.iw_bound, n_dims))
    out["KL_nats"] = mean_se(table.kl.sum(axis=1))
    return out


def likelihood_columns(iw: int) -> list[str]:
    cols = ["index", "seed", "l1_nats", "l1_bpd"]
    if iw > 1:
        cols += ["iw", "lk_nats", "lk_bpd"]
    return cols + ["kl_nats"]


def likelihood_rows(start: int, scores: Scores | ScoreTable, n_dims: int, iw: int) -> list[dict]:
    """One dict per image, keys `likelihood_columns(iw)`; index counts from `start`."""
    n = len(scores.elbo)
    seeds = scores.seeds if isinstance(scores, ScoreTable) else np.full(n, scores.seed)
    l1_bpd = bits_per_dim(scores.elbo, n_dims)
    lk_bpd = bits_per_dim(scores.iw_bound, n_dims)
    kl = scores.kl.sum(axis=1)
    rows = []
    for j in range(n):
        row = {"index": start + j, "seed": int(seeds[j]), "l1_nats": float(scores.elbo[j]), "l1_bpd": float(l1_bpd[j])}
        if iw > 1:
            row.update(iw=iw, lk_nats=float(scores.iw_bound[j]), lk_bpd=float(lk_bpd[j]))
        row["kl_nats"] = float(kl[j])
        rows.append(row)
    return rows
