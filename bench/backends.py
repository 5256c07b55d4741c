"""What is timed: one call of a case on one backend.

A *case* is a graph call (the sampler, the encoder, the scorer with one draw and one k) or a biva_score request
(`scorer_iw`: the IW likelihood with K importance samples per image; `ood_mode`, `ood_mean1/4/16`: the OOD
statistics by each estimator, with the default ks 1..L-1). In process, a score case runs scoring.run_score,
the plan Triton's biva_score front model runs (its noise drawn from a seed inside the call, as the server does),
on the backend's scorer; through Triton it is one biva_score request.

Graph inputs come from biva_export.onnx_export.example_inputs (binary images, normal noise and latents, k and
temperature drawn at random, never zeros); a small pool of distinct input sets is built before timing and
rotated, so generating inputs is not timed, as with perf_analyzer.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np
import torch

from biva_core.contract import DETECT, ENCODE, ENCODER, SAMPLE, SAMPLER, SCORE, SCORER, GraphSpec, T, noise_rng
from biva_core.routing import call_rows, run_in_slices, served_runtime
from biva_core.scoring import ScoreRequest, run_score

from .loadgen import infer_inputs

POOL = 3  # distinct input sets per shape


OOD_SAMPLES = (1, 4, 16)  # the mean estimator's draws in the OOD cases


@dataclass(frozen=True)
class Case:
    name: str  # "sampler", "encoder", "scorer_k1", "scorer_iw", "ood_mode", "ood_mean<S>"
    graph: str  # ONNX graph and Triton graph model
    rows_per_image: int  # scorer rows per image: 1, or the score request's cost (ScoreRequest.rows)
    triton_model: str  # model the Triton clients call: the graph model, or the biva_score front model
    score: ScoreRequest | None = None  # the biva_score request of a score case
    # the case's own settings, which the bench loop reads instead of testing its name
    batches: str = "batches"  # the BenchConfig field holding its images per request
    measure: str = "measure"  # the BenchConfig field holding its measurement windows
    alternated: bool = True  # served and torch.compile timed in turn too (not for calls of seconds)
    encoder_rows_flops: bool = False  # FLOPs also counted as rows_per_image whole encoder passes (IW: the route before)
    network_timeout_s: float = 60.0  # the blocking clients' timeout (the http client's default)


def make_cases(iw: int, n_layers: int) -> dict[str, Case]:
    ks = tuple(range(1, n_layers)) or (1,)
    ood = {"ood_mode": ScoreRequest("mode", 1, 1, ks, False),
           **{f"ood_mean{s}": ScoreRequest("mean", s, 1, ks, False) for s in OOD_SAMPLES}}
    iw_request = ScoreRequest("sample", 1, iw, ())
    return {"sampler": Case("sampler", SAMPLER, 1, SAMPLER), "encoder": Case("encoder", ENCODER, 1, ENCODER),
            "scorer_k1": Case("scorer_k1", SCORER, 1, SCORER),
            # K = 1000 calls take tens of seconds on 2 cores: windows of their own, no calls in turn
            "scorer_iw": Case("scorer_iw", SCORER, iw_request.rows(1), SCORE, iw_request, batches="iw_batches",
                              measure="iw_measure", alternated=False, encoder_rows_flops=True,
                              network_timeout_s=900.0),
            **{n: Case(n, SCORER, r.rows(1), SCORE, r, batches="ood_batches") for n, r in ood.items()}}


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
    graph model loads it (runtimes.aoti_runner); numpy in, numpy out, like OrtRunner."""

    def __init__(self, path, spec: GraphSpec, threads: int):
        from biva_core.runtimes import aoti_runner

        self.run, self.names = aoti_runner(str(path), threads), spec.input_names

    def prepare(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        return tuple(feeds[n] for n in self.names)

    def __call__(self, prepared: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        return self.run(*prepared)


class ServedRunner:
    """The route the served graph models take (routing.served_runtime) on `threads` threads: the AOTInductor package
    from AOTI_MIN_ROWS rows and AOTI_MIN_THREADS threads (in slices of AOTI_SLICE_ROWS, full slices on the slice
    package where exported), ONNX Runtime for the rest, in process: numpy in, numpy out."""

    def __init__(self, ort: "OrtRunner", aoti: AotiRunner, sliced: AotiRunner | None, threads: int):
        self.ort, self.aoti, self.sliced, self.threads = ort, aoti, sliced, threads

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return feeds

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if served_runtime("aoti", call_rows(feeds), self.threads) == "aoti":
            full = None if self.sliced is None else (lambda f: self.sliced(self.sliced.prepare(f)))
            return run_in_slices(lambda f: self.aoti(self.aoti.prepare(f)), feeds, full=full)
        return self.ort(feeds)


class OrtRunner:
    def __init__(self, session):
        self.session = session

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return feeds

    def __call__(self, prepared: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, prepared)


def alternated_medians(runs: dict[str, Callable[[], Any]], reps: int, turn: int = 1,
                       settle: int = 0) -> dict[str, float]:
    """Median seconds per call of each run: two warm-up calls each, then `reps` rounds in which every run in turn
    makes `settle` untimed calls and then `turn` timed ones in a row. Alternating makes a machine whose speed drifts
    (shared cores) slow every run alike, so ratios of these medians hold where rates from separate windows do not;
    the untimed calls keep a short call from meeting the previous run's threads still spin-waiting."""
    for f in runs.values():
        f(), f()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for name, f in runs.items():
            for _ in range(settle):
                f()
            for _ in range(turn):
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def rows_key(feeds: dict[str, np.ndarray]) -> str:
    """A graph call's shape: "B" rows, or "BxS" where the scorer's noise carries S > 1 samples per image."""
    noise = feeds.get(T.noise)
    if noise is not None and noise.ndim == 3 and noise.shape[1] > 1:
        return f"{noise.shape[0]}x{noise.shape[1]}"
    return str(next(iter(feeds.values())).shape[0])


def inprocess_call(runner, case: Case, make_inputs: Callable[..., dict[str, np.ndarray]], batch: int,
                   graph_max: int, seed: int, spec: GraphSpec) -> Callable[[int], Any]:
    """A call(i) running `batch` images of `case` on `runner`; make_inputs(rows, seed) gives raw graph inputs.
    A score case runs scoring.run_score on the runner's scorer (`spec`), call i drawing from seed + i."""
    if case.score is None:
        pool = [runner.prepare(make_inputs(batch, seed + j)) for j in range(POOL)]
        return lambda i: runner(pool[i % POOL])
    images = [make_inputs(batch, seed + j)[T.images] for j in range(POOL)]
    dims = {t.name: t.dims for t in spec.inputs + spec.outputs}
    noise_dim, groups = dims[T.noise][-1], dims[T.kl][-1]
    exec_calls = lambda feeds, ks: [runner(runner.prepare(f)) for f in feeds]  # noqa: E731
    return lambda i: run_score(case.score, images[i % POOL], noise_rng(seed + i), noise_dim, graph_max, groups,
                               exec_calls)


# ---- Triton clients -------------------------------------------------------------------------------

def request_feeds(case: Case, make_inputs: Callable[[int, int], dict[str, np.ndarray]], batch: int,
                  seed: int) -> list[dict[str, np.ndarray]]:
    """POOL requests' inputs (name -> array) for the Triton model `case` calls."""
    pool = []
    for j in range(POOL):
        if case.score is None:
            pool.append(make_inputs(batch, seed + j))
            continue
        r, rng = case.score, np.random.default_rng(seed + j)  # biva_score: the front model draws the noise
        feeds = {T.images: make_inputs(batch, seed + j)[T.images], T.iw: np.array([r.iw], np.int64),
                 T.estimator: np.array([r.estimator.encode()], object), T.samples: np.array([r.samples], np.int64),
                 T.seed: rng.integers(0, 2**62, size=1, dtype=np.int64)}
        pool.append({**feeds, **({T.ks: np.array(r.ks, np.int64)} if r.ks else {})})
    return pool


API_MODELS = {SAMPLER: SAMPLE, ENCODER: ENCODE, SCORER: SCORE}  # the front (API) model a user's request of a graph
#                                                               case reaches: it splits rows over the instances
API_SCORE = ScoreRequest("sample", 1, 1, (1,))  # scorer_k1 as a biva_score request: one draw, k = 1


def api_case(case: Case) -> Case:
    """A graph case as a user sends it: to its front model, with the front's request (`api_feeds`)."""
    return Case(case.name, case.graph, case.rows_per_image, API_MODELS[case.graph],
                API_SCORE if case.graph == SCORER else None)


def api_feeds(case: Case, make_inputs: Callable[[int, int], dict[str, np.ndarray]], batch: int,
              seed: int) -> list[dict[str, np.ndarray]]:
    """POOL requests for `api_case(case)`'s front model; the front draws the noise from the seed."""
    if case.graph == SCORER:
        return request_feeds(api_case(case), make_inputs, batch, seed)
    seeds = [np.array([seed + j], np.int64) for j in range(POOL)]
    if case.graph == SAMPLER:
        return [{T.n: np.array([batch], np.int64), T.seed: s, T.temperature: np.ones(1, np.float32)} for s in seeds]
    return [{T.images: make_inputs(batch, seed + j)[T.images], T.seed: s} for j, s in enumerate(seeds)]


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


# ---- the API sweep: requests as users send them, through the fronts --------------------------------

@dataclass(frozen=True)
class ApiLoad:
    """One request of the API sweep: `images` images in (biva_score, biva_detect) or out (biva_sample's n) per
    request to the API model `model`; `case` is the in-process case whose work it is (its best in-process rate
    of what the graph models run is this request's ceiling) and, for biva_score, whose ScoreRequest it sends."""

    name: str
    model: str
    images: int
    case: Case
    outputs: tuple[str, ...]


def api_loads(cases: dict[str, Case], score_images: tuple[int, ...], sample_n: tuple[int, ...],
              detect: bool) -> list[ApiLoad]:
    """biva_score with the OOD estimator (the ood_mode case's request: mode, every k of 1..L-1) on each of
    `score_images` images, biva_sample with each n of `sample_n`, and biva_detect on one image where `detect`."""
    ood, sampler = cases["ood_mode"], cases["sampler"]
    score_out = (T.elbo, T.l_gt_k, T.kl)  # what biva-client ood score asks for
    return ([ApiLoad(f"score_ood_b{b}", SCORE, b, ood, score_out) for b in score_images]
            + [ApiLoad(f"sample_n{n}", SAMPLE, n, sampler, (T.images,)) for n in sample_n]
            + ([ApiLoad("detect_b1", DETECT, 1, ood, (T.ood_score, T.ood_flag))] if detect else []))


def api_load_feeds(load: ApiLoad, make_inputs: Callable[[int, int], dict[str, np.ndarray]],
                   seed: int) -> list[dict[str, np.ndarray]]:
    """POOL requests of `load`, as biva_client forms them (make_inputs(rows, seed)[images]: binary images)."""
    if load.model == SCORE:
        return request_feeds(load.case, make_inputs, load.images, seed)
    if load.model == SAMPLE:
        return api_feeds(load.case, make_inputs, load.images, seed)
    return [{T.images: make_inputs(load.images, seed + j)[T.images], T.seed: np.array([seed + j], np.int64)}
            for j in range(POOL)]
