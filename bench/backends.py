"""What is timed: one call of a graph case on one backend, with pre-generated random inputs.

A *case* is a graph at some rows per image: the sampler, the encoder, the scorer with K = 1, and the
IW likelihood with K importance samples per image (`scorer_iw`: a biva_score request with iw = K). For
K > 1 the in-process backends run the scorer calls Triton's biva_score front model makes (contract.iw_calls:
a few images with up to IW_CALL_ROWS samples each per call, logsumexp over K), the calls holding sample 0
with one value of k (its L^{>k} pass; the front model passes the request's ks there), the others with none.

Inputs come from biva_export.onnx_export.example_inputs (binary images, normal noise and latents, k and
temperature drawn at random, never zeros); a small pool of distinct input sets is built before timing and
rotated, so generating inputs is not timed, as with perf_analyzer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np
import torch

from biva_export.contract import ENCODER, IW_CALL_ROWS, SAMPLER, SCORE, SCORER, GraphSpec, LogMeanExp, T, iw_calls

from .loadgen import infer_inputs

POOL = 3  # distinct input sets per shape


@dataclass(frozen=True)
class Case:
    name: str  # "sampler", "encoder", "scorer_k1", "scorer_iw"
    graph: str  # ONNX graph and Triton graph model
    rows_per_image: int  # graph rows per image: 1, or K importance samples
    triton_model: str  # model the Triton clients call: the graph model, or the biva_score front model


def make_cases(iw: int) -> dict[str, Case]:
    return {
        "sampler": Case("sampler", SAMPLER, 1, SAMPLER),
        "encoder": Case("encoder", ENCODER, 1, ENCODER),
        "scorer_k1": Case("scorer_k1", SCORER, 1, SCORER),
        "scorer_iw": Case("scorer_iw", SCORER, iw, SCORE),
    }


# ---- in process: PyTorch eager, torch.compile and ONNX Runtime ------------------------------------

class TorchRunner:
    """PyTorch eager reference: torch.no_grad, eval mode, weight norm folded (the exported weights)."""

    def __init__(self, module: torch.nn.Module, spec: GraphSpec):
        self.module, self.names = module.eval(), spec.input_names

    def prepare(self, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(feeds[n]) for n in self.names)

    def __call__(self, prepared: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        with torch.no_grad():
            return [o.numpy() for o in self.module(*prepared)]


class CompiledRunner(TorchRunner):
    """torch.compile (inductor, CPU) of the same graph module, with static shapes: compiled for each input
    shape when `prepare` first sees it, as a server with fixed batch sizes would, so compilation is never
    inside a timed call; `compile_s` records that first call's seconds per call shape (rows_key)."""

    def __init__(self, module: torch.nn.Module, spec: GraphSpec):
        super().__init__(module, spec)
        # every batch size is its own compiled graph; past dynamo's default of 8 per forward it would fall
        # back to eager silently, and the bench would time eager under this runner's name
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        self.module = torch.compile(self.module, backend="inductor", dynamic=False)
        self.compile_s: dict[str, float] = {}  # rows_key -> seconds

    def prepare(self, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        prepared = super().prepare(feeds)
        rows = rows_key(feeds)
        if rows not in self.compile_s:
            t = time.perf_counter()
            self(prepared)
            self.compile_s[rows] = time.perf_counter() - t
        return prepared


class AotiRunner:
    """The repository's AOTInductor package of the graph (biva-export --runtime aoti), loaded as the served
    graph model loads it (contract.aoti_runner); numpy in, numpy out, like OrtRunner."""

    def __init__(self, path, spec: GraphSpec, threads: int):
        from biva_export.contract import aoti_runner

        self.run, self.names = aoti_runner(str(path), threads), spec.input_names

    def prepare(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        return tuple(feeds[n] for n in self.names)

    def __call__(self, prepared: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        return self.run(*prepared)


class OrtRunner:
    def __init__(self, session):
        self.session = session

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return feeds

    def __call__(self, prepared: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, prepared)


def rows_key(feeds: dict[str, np.ndarray]) -> str:
    """A graph call's shape: "B" rows, or "BxS" where the scorer's noise carries S > 1 samples per image."""
    noise = feeds.get(T.noise)
    if noise is not None and noise.ndim == 3 and noise.shape[1] > 1:
        return f"{noise.shape[0]}x{noise.shape[1]}"
    return str(next(iter(feeds.values())).shape[0])


def iw_plan(samples: int, batch: int, graph_max: int) -> list[tuple[slice, slice, int]]:
    """The scorer calls biva_score makes for `samples` importance samples of `batch` images: (images, samples,
    J), J = 1 value of k in the calls holding sample 0 (its L^{>k} pass), 0 in the others."""
    return [(imgs, smp, int(smp.start == 0)) for imgs, smp in iw_calls(samples, batch, min(IW_CALL_ROWS, graph_max))]


def inprocess_call(runner, case: Case, make_inputs: Callable[..., dict[str, np.ndarray]], batch: int,
                   graph_max: int, seed: int, log_w_index: int = 0) -> Callable[[int], Any]:
    """A call(i) running `batch` images of `case` on `runner`; make_inputs(rows, seed, samples=1, ks=1) gives
    raw inputs. For K > 1, output `log_w_index` of the scorer is the log weight of each sample."""
    if case.rows_per_image == 1:
        pool = [runner.prepare(make_inputs(batch, seed + j)) for j in range(POOL)]
        return lambda i: runner(pool[i % POOL])
    calls = iw_plan(case.rows_per_image, batch, graph_max)
    shape = lambda imgs, smp, ks: (imgs.stop - imgs.start, smp.stop - smp.start, ks)  # noqa: E731  (b, S, J)
    pools = {}
    for b, s, ks in {shape(*c) for c in calls}:  # k = 0 where there is one
        feeds = [make_inputs(b, seed + 101 * j + s, s, ks) for j in range(2)]
        pools[b, s, ks] = [runner.prepare({**f, T.k: np.zeros_like(f[T.k])}) for f in feeds]

    def call(i: int) -> np.ndarray:
        log_w = np.empty((case.rows_per_image, batch))  # (K, B)
        for c in calls:
            log_w[c[1], c[0]] = runner(pools[shape(*c)][i % 2])[log_w_index].T
        lme = LogMeanExp(batch)  # log (1/K) sum_k w_k per image, as biva_score computes it
        lme.add(log_w)
        return lme.value()
    return call


# ---- Triton clients -------------------------------------------------------------------------------

def request_feeds(case: Case, make_inputs: Callable[[int, int], dict[str, np.ndarray]], batch: int,
                  seed: int) -> list[dict[str, np.ndarray]]:
    """POOL requests' inputs (name -> array) for the Triton model `case` calls."""
    pool = []
    for j in range(POOL):
        if case.rows_per_image == 1:
            pool.append(make_inputs(batch, seed + j))
        else:  # biva_score: the front model draws the noise from the seed
            rng = np.random.default_rng(seed + j)
            pool.append({T.images: make_inputs(batch, seed + j)[T.images],
                         T.iw: np.array([case.rows_per_image], np.int64),
                         T.seed: rng.integers(0, 2**62, size=1, dtype=np.int64)})
    return pool


def triton_inputs(client_mod, case: Case, make_inputs: Callable[[int, int], dict[str, np.ndarray]], batch: int,
                  seed: int) -> list[list[Any]]:
    """POOL request bodies (lists of InferInput) for tritonclient.http or .grpc (`client_mod`)."""
    return [infer_inputs(client_mod, feeds) for feeds in request_feeds(case, make_inputs, batch, seed)]


def sync_call(client, client_mod, model: str, bodies: list[list[Any]], outputs: list[str]) -> Callable[[int], Any]:
    """tritonclient.http / .grpc blocking infer; outputs are asked for in binary form."""
    if client_mod.__name__.endswith("http"):
        requested = [client_mod.InferRequestedOutput(o, binary_data=True) for o in outputs]
    else:
        requested = [client_mod.InferRequestedOutput(o) for o in outputs]
    return lambda i: client.infer(model, bodies[i % len(bodies)], outputs=requested)


def async_call(client, model: str, bodies: list[list[Any]]) -> Callable[[int], Awaitable[Any]]:
    """tritonclient.grpc.aio infer, for closed-loop concurrent clients."""
    return lambda i: client.infer(model, bodies[i % len(bodies)])
