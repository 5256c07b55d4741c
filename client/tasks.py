"""Data-set level jobs over a `BivaClient`: load inputs, split them into requests, send them concurrently.

Seeds. The server draws each request's noise from the request's seed, so a job that splits its inputs
into batches gives batch i (the images [i * batch_size, (i + 1) * batch_size)) the seed base_seed + i.
The same base seed, batch size and inputs give the same numbers, and biva-eval / PyTorch reproduce them
with `evaluate_request(model, x_i, NoiseStream(base_seed + i), req)`. `sample_images` does the same with
chunks of at most the server's max_n samples (one chunk, seed base_seed, when n <= max_n).
"""
from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from biva_core.contract import T, parse_ks
from biva_core.scoring import ScoreRequest
from biva_core.stats import bits_per_dim, mean_se, ood_scores, statistics

from .api import BivaClient, Encoding, InputError, ModelMeta, Scores, _as_input_error, check_score_request, check_seed

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
    """contract.parse_ks for the command line: '1,2,3' -> (1, 2, 3); None or '' -> 1..L-1; InputError if bad."""
    with _as_input_error():
        return parse_ks(text, n_layers)


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

MAX_SAMPLE_REQUESTS = 64  # a sampling job is at most this many requests of the server's max_n samples


def sample_images(client: BivaClient, n: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """n samples (n, C, H, W). Above the server cap max_n, chunk j of max_n samples uses seed + j; at most
    MAX_SAMPLE_REQUESTS chunks (InputError naming the cap, before anything is sent or allocated)."""
    cap = client.meta.caps.max_n
    if not 1 <= n <= cap * MAX_SAMPLE_REQUESTS:
        raise InputError(f"n: got {n}, expected 1..{cap * MAX_SAMPLE_REQUESTS} ({MAX_SAMPLE_REQUESTS} requests of "
                         f"the server's cap max_n = {cap}); draw more with several commands and other --seed")
    check_seed(seed)
    parts = [client.sample(stop - start, batch_seed(seed, j), temperature)
             for j, (start, stop) in enumerate(batches(n, cap))]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


@dataclass
class ScoreTable:
    """Per-image values in nats over a whole data set, in input order, by the request's estimator."""

    elbo: np.ndarray  # (N,) L_1
    iw_bound: np.ndarray | None  # (N,) L_K, None when not asked for
    l_gt_k: np.ndarray  # (N, len(ks)) L^{>k}
    kl: np.ndarray  # (N, G)
    request: ScoreRequest  # estimator, samples, iw, ks
    seeds: np.ndarray  # (N,) the seed of the request each image was scored in

    @property
    def ks(self) -> tuple[int, ...]:
        return self.request.ks

    @property
    def iw(self) -> int:
        return self.request.iw

    def l_gt(self, k: int) -> np.ndarray:
        return self.l_gt_k[:, self.ks.index(k)]

    def llr(self, k: int) -> np.ndarray:
        """LLR^{>k} = L_1 - L^{>k} (Havtorn et al., 2021)."""
        return self.elbo - self.l_gt(k)

    def scores(self) -> dict[str, np.ndarray]:
        """Every OOD score the table supports (biva_core.stats.ood_scores), larger = more anomalous."""
        return ood_scores(self.elbo, self.kl, self.l_gt_k, self.ks, self.iw_bound if self.iw > 1 else None)

    def statistics(self) -> np.ndarray:
        """The detector's per-image statistics (biva_core.stats.statistics)."""
        return statistics(self.elbo, self.kl, self.l_gt_k)


def check_batch_size(meta: ModelMeta, batch_size: int, req: ScoreRequest = ScoreRequest()) -> None:
    """Refuse a job whose requests the server would refuse, before anything is sent."""
    cap = meta.caps.max_images
    if not 1 <= batch_size <= cap:
        raise InputError(f"batch size: expected 1..{cap} (server cap max_images), got {batch_size}")
    check_score_request(meta, batch_size, req)


@dataclass(frozen=True)
class Job:
    """How a data-set job is split into requests and sent."""

    seed: int = 0  # base seed: batch i is sent with seed + i
    batch_size: int = 100  # images per request
    concurrency: int = 1  # requests in flight at once
    progress: bool | None = False  # progress bar: True, False, or None (only on a terminal)


def _in_order(client: BivaClient, images: np.ndarray, job: Job, call: Callable[[np.ndarray, int], object],
              on_batch: Callable[[int, int, object], None] | None, desc: str) -> list:
    """call(images of batch i, seed + i) for every batch, `job.concurrency` at a time; the results in batch order,
    `on_batch(i, first image index, result)` called in batch order as they complete."""
    spans = batches(len(images), job.batch_size)
    seeds = [batch_seed(job.seed, i) for i in range(len(spans))]
    results: list = [None] * len(spans)
    next_i = 0
    with _progress(len(images), desc, job.progress) as bar:
        for i, res in imap_unordered(lambda i: call(images[slice(*spans[i])], seeds[i]), len(spans),
                                     job.concurrency):
            results[i] = res
            bar.update(spans[i][1] - spans[i][0])
            while next_i < len(spans) and results[next_i] is not None:
                if on_batch is not None:
                    on_batch(next_i, spans[next_i][0], results[next_i])
                next_i += 1
    return results


def score_images(client: BivaClient, images: np.ndarray, job: Job = Job(), req: ScoreRequest = ScoreRequest(),
                 on_batch: BatchCallback | None = None, desc: str = "score") -> ScoreTable:
    """Score every image with `req`'s estimator, iw and ks; batch i is one request with seed `job.seed + i`.

    `on_batch(i, start, scores)` is called in batch order (a finished batch waits for the ones before it),
    so a caller can write rows incrementally and in input order.
    """
    client.check_images(images[:1])
    check_batch_size(client.meta, min(job.batch_size, len(images)), req)
    results = _in_order(client, images, job, lambda x, seed: client.score(
        x, seed, req.iw, req.ks, req.estimator, req.samples, req.want_iw), on_batch, desc)
    cat = lambda name: np.concatenate([getattr(r, name) for r in results])  # noqa: E731
    return ScoreTable(cat(T.elbo), cat(T.iw_bound) if req.want_iw else None, cat(T.l_gt_k), cat(T.kl), req,
                      image_seeds(len(images), job.batch_size, job.seed))


def detect_images(client: BivaClient, images: np.ndarray, job: Job = Job(), desc: str = "detect"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The served detector (biva_detect) on every image: (scores (N,), flagged (N,)); batch i uses seed + i."""
    client.check_images(images[:1])
    check_batch_size(client.meta, min(job.batch_size, len(images)))
    results = _in_order(client, images, job, client.detect, None, desc)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def encode_images(client: BivaClient, images: np.ndarray, job: Job = Job()) -> Encoding:
    """biva_encode over a data set; batch i uses seed `job.seed + i`. Encoding.seed is the base seed."""
    client.check_images(images[:1])
    check_batch_size(client.meta, min(job.batch_size, len(images)))
    results = _in_order(client, images, job, client.encode, None, "encode")
    cat = lambda name: np.concatenate([getattr(r, name) for r in results])  # noqa: E731
    return Encoding(cat(T.z), cat(T.q_mu), cat(T.q_log_std), cat(T.kl), job.seed)


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
    enc = encode_images(client, images, Job(seed, batch_size))
    cols = [images] + [regenerate_latents(client, enc.z, k, seed, batch_size, temperature) for k in ks]
    return np.stack(cols, axis=1)  # (N, 1 + len(ks), C, H, W)


# ---- summaries ------------------------------------------------------------------------------------

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
    lk_bpd = bits_per_dim(scores.iw_bound, n_dims) if iw > 1 else None
    kl = scores.kl.sum(axis=1)
    rows = []
    for j in range(n):
        row = {"index": start + j, "seed": int(seeds[j]), "l1_nats": float(scores.elbo[j]), "l1_bpd": float(l1_bpd[j])}
        if iw > 1:
            row.update(iw=iw, lk_nats=float(scores.iw_bound[j]), lk_bpd=float(lk_bpd[j]))
        row["kl_nats"] = float(kl[j])
        rows.append(row)
    return rows
