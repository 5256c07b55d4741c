"""perf_analyzer's measurement method, for in-process calls and for concurrent clients.

Warm up, then fixed measurement windows; a result counts once 3 consecutive windows agree within
`stability` (throughput and p50 latency each within that fraction of the three windows' mean), or when
`max_windows` is reached (then `stable` is false). A window is extended until it holds `min_calls`
completed calls, so slow calls still give each window a few latencies. The reported figures pool the
last 3 windows: throughput = images / time, latency percentiles over their calls.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

PERCENTILES = (50, 90, 95, 99)
N_STABLE = 3  # consecutive windows that must agree


@dataclass(frozen=True)
class MeasureConfig:
    warmup_s: float  # calling, unmeasured, before the first window
    window_s: float  # length of one measurement window
    max_windows: int  # stop trying to stabilise after this many windows
    min_calls: int = 3  # a window is extended until this many calls have completed in it
    stability: float = 0.10  # perf_analyzer's default: 10 %


@dataclass
class Window:
    duration_s: float
    calls: int
    images: int
    latencies_s: list[float] = field(repr=False)

    @property
    def images_per_s(self) -> float:
        return self.images / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def p50_s(self) -> float:
        return float(np.median(self.latencies_s)) if self.latencies_s else float("nan")


@dataclass
class Measurement:
    images_per_s: float
    latency_ms: dict[str, float]  # p50, p90, p95, p99, mean
    calls: int  # calls in the reported (last 3) windows
    images_per_call: int
    stable: bool
    windows: list[dict[str, float]]  # every window: duration_s, calls, images_per_s, p50_ms
    concurrency: int = 1
    server: dict[str, Any] | None = None  # Triton statistics deltas over the reported windows
    load: dict[str, Any] | None = None  # concurrent clients: how the load was generated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `reps` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def is_stable(windows: list[Window], tol: float) -> bool:
    if len(windows) < N_STABLE:
        return False
    last = windows[-N_STABLE:]
    for values in ([w.images_per_s for w in last], [w.p50_s for w in last]):
        mean = float(np.mean(values))
        if not mean > 0 or any(abs(v - mean) > tol * mean for v in values):
            return False
    return True


def summarise(windows: list[Window], images_per_call: int, stable: bool, concurrency: int) -> Measurement:
    last = windows[-N_STABLE:]
    lat = np.array([x for w in last for x in w.latencies_s]) * 1e3
    duration = sum(w.duration_s for w in last)
    images = sum(w.images for w in last)
    latency = {f"p{p}": float(np.percentile(lat, p)) for p in PERCENTILES} if lat.size else {}
    latency["mean"] = float(lat.mean()) if lat.size else float("nan")
    per_window = [{"duration_s": w.duration_s, "calls": w.calls, "images_per_s": w.images_per_s,
                   "p50_ms": w.p50_s * 1e3} for w in windows]
    return Measurement(images / duration if duration else 0.0, latency, int(lat.size), images_per_call, stable,
                       per_window, concurrency)


def measure_sync(call: Callable[[int], Any], images_per_call: int, cfg: MeasureConfig,
                 boundary: Callable[[], Any] | None = None) -> tuple[Measurement, list[Any]]:
    """One client calling `call(i)` back to back (i rotates the inputs). `boundary()` is called at the
    start of every window and at the end (e.g. a server statistics snapshot); the snapshots come back."""
    i = 0
    end = time.perf_counter() + cfg.warmup_s
    while True:  # at least one warm-up call, whatever warmup_s is
        call(i)
        i += 1
        if time.perf_counter() >= end:
            break
    windows: list[Window] = []
    snaps = []
    while len(windows) < cfg.max_windows:
        snaps.append(boundary() if boundary else None)
        lat = []
        t0 = time.perf_counter()
        while True:
            s = time.perf_counter()
            call(i)
            e = time.perf_counter()
            i += 1
            lat.append(e - s)
            if e - t0 >= cfg.window_s and len(lat) >= cfg.min_calls:
                break
        windows.append(Window(e - t0, len(lat), len(lat) * images_per_call, lat))
        if is_stable(windows, cfg.stability):
            break
    snaps.append(boundary() if boundary else None)
    return summarise(windows, images_per_call, is_stable(windows, cfg.stability), 1), snaps


async def measure_async(call: Callable[[int], Awaitable[Any]], concurrency: int, images_per_call: int,
                        cfg: MeasureConfig, boundary: Callable[[], Awaitable[Any]] | None = None
                        ) -> tuple[Measurement, list[Any]]:
    """`concurrency` closed-loop clients (coroutines), each sending its next request when the previous
    answer arrives, as perf_analyzer's concurrency mode does."""
    records: list[tuple[float, float]] = []  # (completion time, latency), in completion order
    stop = asyncio.Event()
    errors: list[BaseException] = []

    async def worker(w: int) -> None:
        i = w
        while not stop.is_set():
            s = time.perf_counter()
            try:
                await call(i)
            except Exception as exc:  # surfaced by the controller, which would otherwise wait forever
                errors.append(exc)
                return
            e = time.perf_counter()
            records.append((e, e - s))
            i += concurrency

    async def pause(seconds: float) -> None:
        await asyncio.sleep(seconds)
        if errors:
            raise errors[0]

    cpu = time.process_time()  # this process's CPU, all threads: the clients' cost
    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    try:
        await pause(cfg.warmup_s)
        while not records:  # at least one answer before measuring
            await pause(0.005)
        windows: list[Window] = []
        snaps = []
        while len(windows) < cfg.max_windows:
            snaps.append(await boundary() if boundary else None)
            t0 = time.perf_counter()
            first = len(records)
            await pause(cfg.window_s)
            while len(records) - first < cfg.min_calls:
                await pause(0.005)
            t1 = time.perf_counter()
            done = [r for r in records[first:] if r[0] < t1]
            lat = [r[1] for r in done]
            windows.append(Window(t1 - t0, len(lat), len(lat) * images_per_call, lat))
            if is_stable(windows, cfg.stability):
                break
        snaps.append(await boundary() if boundary else None)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    cpu = time.process_time() - cpu
    m = summarise(windows, images_per_call, is_stable(windows, cfg.stability), concurrency)
    m.load = {"generator": "asyncio", "client_processes": 1,
              "client_cpu_us_per_call": cpu / len(records) * 1e6 if records else None}
    return m, snaps
