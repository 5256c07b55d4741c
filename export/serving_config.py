"""How biva-export serves the graph and front models (`ServingConfig`, its options, written into every
config.pbtxt), and the package threads a layout gives each graph instance. The export's policy: the served code
reads what it wrote from the config parameters, never this module.
"""
from __future__ import annotations

from dataclasses import dataclass

from biva_core.routing import AOTI_SLICE_ROWS


@dataclass(frozen=True)
class ServingConfig:
    """How the graph and front models are served (biva-export's options, written into every config.pbtxt)."""

    backend: str = "python"  # "python" (ONNX Runtime in the python backend) or "onnxruntime" (native, GPU)
    max_batch: int = 1024  # rows per graph call: max_batch_size of the graph models
    # instances per graph model. Two, not one with all threads: Triton 2.51's dynamic batcher with a queue policy
    # (graph_queue below) misses the wake-up when a lone instance frees up, so requests that arrive then wait
    # its 500 ms timeout; with two the other instance takes them (docs/speed.md: batching)
    instances: int = 2
    # instances per front (API) model: each runs one request at a time and waits on its graph calls, so they bound
    # how many requests reach the graph models together. 4, not 2: at 16 gRPC clients on 2 cores the p99 fell from
    # 1.0-1.5 s (busy answers, then their 1 s Retry-After) to 0.1-0.23 s at the same images/s; 8 and 16 gained
    # 0-10% more for 2-4x the stubs (22 MB each; docs/speed.md: front instances)
    front_instances: int = 4
    threads: int = 0  # ONNX Runtime intra-op threads per python-backend graph instance (0: cores / instances)
    # the package's threads per instance (0: as ONNX Runtime's, the instance's share of the cores). Every core per
    # instance ran a lone direct 64-row call faster, but two at once fell to half (OpenMP's threads spin-wait and take
    # the cores from each other) and the front models' requests, which use both instances, slowed by 10-35%; with
    # OpenMP's threads asleep when idle (OMP_WAIT_POLICY=PASSIVE) the package itself ran 1.2-2x slower
    # (docs/speed.md: threads)
    aoti_threads: int = 0
    # what runs the python backend's graphs: "aoti", the AOTInductor packages from AOTI_MIN_ROWS rows on instances of
    # AOTI_MIN_THREADS package threads or more and ONNX Runtime for the rest (the fastest measured: docs/speed.md), or
    # "onnxruntime" alone (export in seconds instead of minutes)
    runtime: str = "aoti"
    spinning: bool = False  # idle ONNX Runtime intra-op threads busy-wait for work (ORT's default; no faster
    #                         served, measured: docs/speed.md)
    dynamic_batching: bool = True  # the graph models batch concurrent calls (False: one call per execution)
    # dynamic batcher preferred batch sizes (none: batch what has arrived). A full slice: the batcher then merges
    # queued calls only up to 32 rows, so the two halves a front model sends to both instances at once stay apart
    # (without it, 5 of 20 64-image biva_sample requests ran both halves on one instance while the other idled,
    # and their mean latency was 1.2x the median); a larger call still runs alone. biva-export --backend
    # onnxruntime (the GPU route) leaves it out.
    preferred: tuple[int, ...] = (AOTI_SLICE_ROWS,)
    # dynamic batcher: longest a request waits for others to join its batch. 0: an idle instance takes what is
    # queued at once (under load the queue still forms batches: 16 clients 0.93-0.97 of the ceiling vs 0.94 with
    # 500 us); a delay merges the calls a front model sends to both instances at once into one instance's batch
    queue_delay_us: int = 0
    front_queue_per_instance: int = 4  # requests waiting per front instance beyond those running; more: busy
    front_queue_timeout_us: int = 1_000_000  # longest a front request waits for an instance, then "busy"
    graph_queue: int = 256  # requests waiting per graph model (front models' slices and direct callers)

    @property
    def front_queue(self) -> int:
        """Requests waiting per front model beyond those running; more are refused as busy (HTTP 429)."""
        return self.front_queue_per_instance * self.front_instances


def package_threads(sc: ServingConfig, cores: int) -> int:
    """The package threads each graph instance of this layout runs on a machine of `cores` usable cores, as the graph
    model works them out at load: aoti_threads, else the ONNX Runtime threads, else the cores shared out between the
    instances. Below AOTI_MIN_THREADS the instance serves ONNX Runtime alone (routing.served_runtime)."""
    return sc.aoti_threads or sc.threads or max(1, cores // max(1, sc.instances))


