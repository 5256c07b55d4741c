"""The benchmark's one frozen config and its two presets: quick (tiny sizes, seconds, for the tests) and
full (the README's figures)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from biva_core.runtimes import ORT_LEVELS as _ORT_LEVELS

from .measure import MeasureConfig
from .triton import Variant

BACKENDS = ("torch", "compile", "ort", "served", "triton_http", "triton_grpc", "triton_grpc_api")  # the default
# run; "served": the route the graph models take, in process; "triton_grpc_api": a graph case sent as a user sends
# it, to its front model (biva_sample, biva_encode, biva_score), which splits the rows over the graph's instances
# on request: ONNX Runtime on the served graph with its ELUs as single Elu nodes (export/graph_passes.py), so the
# decomposition the exporter writes is measured against the operator it replaces, in the same run
# and "aoti": the repository's AOTInductor packages (biva-export --runtime aoti) in process
EXTRA_BACKENDS = ("ort_elu_native", "aoti")
ALTERNATED = ("served", "compile")  # measured again in alternating calls, where the served/compile ratio comes from
ALTERNATED_API = ("triton_grpc_api", "served")  # likewise at batches of 8 or more, where the gRPC/in-process ratio
#                                                 comes from (the server's processes idle during the in-process calls)
SMALL_TURN = 8  # below AOTI_MIN_ROWS, each turn is at least this many calls in a row after one untimed call: a
#                 few-millisecond call just after the other runtime's would meet its threads still spin-waiting
CASES = ("sampler", "encoder", "scorer_k1", "scorer_iw", "ood_mode", "ood_mean1", "ood_mean4", "ood_mean16")
ORT_LEVELS = tuple(_ORT_LEVELS)
LOADS = ("processes", "async")
SWEEPS = ("api", "graph")  # api: the API models through the fronts, as users send requests (tritonserver as users
#                            start it); graph: batch-1 requests straight to the graph model (--biva-direct, no fronts)


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class BenchConfig:
    mode: str  # "quick" or "full", recorded in the JSON
    batches: tuple[int, ...]  # images per request for sampler, encoder, scorer_k1
    iw: int  # importance samples per image of the scorer_iw case (the paper's K = 1000)
    iw_batches: tuple[int, ...]  # images per request for scorer_iw (K x B graph rows each)
    ood_batches: tuple[int, ...]  # images per request of the OOD cases (ood_mode, ood_mean<S>)
    concurrency: tuple[int, ...]  # closed-loop clients in the sweeps (graph: batch-1 requests; api: each request)
    sweep_case: str  # the case whose graph model the sweep calls directly
    measure: MeasureConfig  # windows for every cell but scorer_iw
    iw_measure: MeasureConfig  # windows for scorer_iw, whose calls take seconds
    gemm_n: int  # n of the n x n x n fp32 matmul that measures the GEMM rate
    gemm_reps: int
    threads: int = field(default_factory=default_threads)  # intra-op threads: torch (eager and compiled), ORT,
    #                                                          each Triton instance
    backends: tuple[str, ...] = BACKENDS
    cases: tuple[str, ...] = CASES
    ort_level: str = "all"  # ONNX Runtime graph optimisation level, in process (Triton's model.py uses ALL)
    ort_saved_graph: bool = False  # in process: optimise once, save, and load the saved graph (no re-optimising)
    variant: Variant = Variant()  # Triton repository settings for the dynamic-batching server
    load: str = "async"  # sweep clients: coroutines of the bench process ("async", the cheapest client measured
    #                      on 2 cores), or client processes ("processes")
    client_procs: int = 0  # processes load: client processes (0: one per client), clients spread over them
    layouts: tuple[Variant, ...] = ()  # extra dynamic-batching sweeps: instances, threads, spinning of each
    layout_rounds: int = 1  # the layouts' sweeps this many times over, interleaved; each layout reports its median
    neighbour: bool = False  # sweeps (processes load): a 1-thread GEMM loop runs beside the server, its rate reported
    alternated_reps: int = 21  # ALTERNATED, when both run: rounds of calls in turn per case and batch (0: none)
    alternated_turn: int = 1  # calls in a row per backend in each round
    sweeps: tuple[str, ...] = SWEEPS  # the concurrency sweeps run (SWEEPS)
    api_score_images: tuple[int, ...] = (1, 16)  # API sweep: images per biva_score request (the OOD estimator)
    api_sample_n: tuple[int, ...] = (1, 64)  # API sweep: n per biva_sample request
    api_protocols: tuple[str, ...] = ("grpc", "http")  # API sweep: each request over each of these
    api_client_procs: int = 2  # API sweep: client processes, the clients spread over them as coroutines (0: one
    #                            per client); one per core keeps the clients' CPU bounded beside the server
    seed: int = 20240601

    def __post_init__(self) -> None:
        for name, allowed, got in (("backend", BACKENDS + EXTRA_BACKENDS, self.backends), ("case", CASES, self.cases)):
            bad = set(got) - set(allowed)
            if bad:
                raise ValueError(f"unknown {name}s {sorted(bad)}; expected some of {list(allowed)}")
        if self.ort_level not in ORT_LEVELS:
            raise ValueError(f"ort_level must be one of {ORT_LEVELS}, got {self.ort_level!r}")
        if self.sweep_case not in ("sampler", "encoder", "scorer_k1"):
            raise ValueError(f"sweep_case must be a graph case, got {self.sweep_case!r}")
        if self.load not in LOADS:
            raise ValueError(f"load must be one of {LOADS}, got {self.load!r}")
        if self.neighbour and self.load != "processes":
            raise ValueError("neighbour needs the processes load (load='processes')")
        if len(set(self.layouts)) != len(self.layouts):
            raise ValueError("a layout is listed twice; use layout_rounds to repeat them")
        if self.client_procs < 0:
            raise ValueError(f"client_procs must be >= 0, got {self.client_procs}")
        if self.layout_rounds < 1:
            raise ValueError(f"layout_rounds must be >= 1, got {self.layout_rounds}")
        if self.alternated_reps < 0 or self.alternated_turn < 1:
            raise ValueError(f"alternated_reps must be >= 0 and alternated_turn >= 1, got {self.alternated_reps} and "
                             f"{self.alternated_turn}")
        bad = set(self.sweeps) - set(SWEEPS)
        if bad:
            raise ValueError(f"unknown sweeps {sorted(bad)}; expected some of {list(SWEEPS)}")
        bad = set(self.api_protocols) - {"grpc", "http"}
        if bad or not self.api_protocols:
            raise ValueError(f"api_protocols must be some of grpc, http, got {list(self.api_protocols)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


FULL = BenchConfig(
    mode="full", batches=(1, 8, 64, 256), iw=1000, iw_batches=(1, 8), ood_batches=(100,), concurrency=(1, 4, 16, 64),
    sweep_case="scorer_k1",
    measure=MeasureConfig(warmup_s=1.0, window_s=2.0, max_windows=10, min_calls=3),
    iw_measure=MeasureConfig(warmup_s=0.0, window_s=2.0, max_windows=5, min_calls=1),
    gemm_n=2048, gemm_reps=10)

# Tiny sizes for the tests and a first look (about two minutes here): batch 64 is kept so every ratio has its
# numbers, K = 64, 3 sweep levels; no torch.compile unless asked (--backends), whose C++ compiling of every call
# shape alone took minutes.
QUICK = replace(
    FULL, mode="quick", batches=(1, 64), iw=64, iw_batches=(1,), ood_batches=(16,), concurrency=(1, 4, 16),
    backends=tuple(b for b in BACKENDS if b != "compile"), cases=("sampler", "encoder", "scorer_k1", "scorer_iw",
                                                                  "ood_mode", "ood_mean4"),
    measure=MeasureConfig(warmup_s=0.05, window_s=0.1, max_windows=4, min_calls=2),
    iw_measure=MeasureConfig(warmup_s=0.0, window_s=0.1, max_windows=3, min_calls=2),
    gemm_n=512, gemm_reps=3, alternated_reps=3)

PRESETS = {"full": FULL, "quick": QUICK}
