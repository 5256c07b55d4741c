"""Closed-loop concurrent clients in separate processes, measured with bench/measure.py's rules.

One asyncio process driving 16 clients spends a core of Python on the client side while the server
wants both cores, and it cannot use the other core for the clients either (one interpreter). Here
every client is its own process with its own tritonclient.grpc client, as perf_analyzer's concurrency
mode uses its own threads: each sends its next batch-1 request when the previous answer arrives.

    controller (this process)                    worker w (spawned, one per client)
    start N workers  ------------------------->  connect, one untimed call, "ready"
    ("run", start time)  --------------------->  wait for the start time, then call back to back;
                                                 every FLUSH_S send (completion time, latency) records
    windows by the controller's clock, server    and "seen up to" the flush time
    snapshot at every boundary; a window is
    counted once every worker has reported
    past its end
    ("stop")  -------------------------------->  finish the call in flight, "stopped"

Completion times and windows share one clock: time.perf_counter is CLOCK_MONOTONIC on Linux, the same in
every process. The workers live for a whole sweep: a level runs the first N of them, so a sweep to 64
clients starts 64 processes once, not 85.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any, Callable

import numpy as np

from .measure import N_STABLE, MeasureConfig, Window, is_stable, summarise

FLUSH_S = 0.05  # a worker sends its records at least this often while it is answered
START_DELAY_S = 0.05  # a level starts this long after "run" is sent, so every worker starts at once
READY_TIMEOUT_S = 120.0  # spawning, importing tritonclient and one call, per worker, on busy cores


class LoadError(RuntimeError):
    """A worker failed (its message), or stopped answering."""


def infer_inputs(client_mod, feeds: dict[str, np.ndarray]) -> list[Any]:
    """One request body (InferInput list) for tritonclient.http or .grpc (`client_mod`)."""
    body = []
    for name, a in feeds.items():
        t = client_mod.InferInput(name, list(a.shape), "FP32" if a.dtype == np.float32 else "INT64")
        t.set_data_from_numpy(a)
        body.append(t)
    return body


def _worker(wid: int, url: str, model: str, bodies: list[dict[str, np.ndarray]], commands, results) -> None:
    """One closed-loop client; runs in its own process."""
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        inputs = [infer_inputs(grpcclient, feeds) for feeds in bodies]
        client.infer(model, inputs[0])  # connected and answered once before any timing
        results.put(("ready", wid, None))
        i = wid
        cmd = commands.recv()
        while cmd[0] == "run":
            i, cmd = _run(client, model, inputs, i, cmd[1], commands, results, wid)
            if cmd[0] == "stop":
                cmd = commands.recv()
        client.close()
    except Exception as exc:  # reported to the controller, which raises it
        results.put(("error", wid, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def _run(client, model: str, inputs: list, i: int, start: float, commands, results, wid: int
         ) -> tuple[int, tuple]:
    """Call back to back from `start` until a command ("stop" or "exit") arrives; records go out every
    FLUSH_S. Returns the next input index and the command."""
    time.sleep(max(0.0, start - time.perf_counter()))
    records: list[tuple[float, float]] = []
    last = time.perf_counter()
    while not commands.poll():
        s = time.perf_counter()
        client.infer(model, inputs[i % len(inputs)])
        e = time.perf_counter()
        records.append((e, e - s))
        i += 1
        if e - last >= FLUSH_S:
            results.put(("records", wid, (e, records)))  # every call completed by e is in `records`
            records, last = [], e
    results.put(("stopped", wid, (float("inf"), records)))
    return i, commands.recv()


class ProcessLoad:
    """`workers` client processes against `model` at `url`, alive for one sweep (a context manager)."""

    def __init__(self, url: str, model: str, bodies: list[dict[str, np.ndarray]], workers: int):
        ctx = mp.get_context("spawn")  # not fork: the bench process holds torch's and gRPC's threads
        self.results = ctx.Queue()
        self.commands, self.procs = [], []
        for w in range(workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(w, url, model, bodies, child, self.results), daemon=True,
                            name=f"biva-bench-client-{w}")
            p.start()
            self.commands.append(parent)
            self.procs.append(p)
        try:
            for _ in range(workers):
                self._get(READY_TIMEOUT_S)  # "ready", or the first worker's error raised
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ProcessLoad:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for c, p in zip(self.commands, self.procs):
            if p.is_alive():
                try:
                    c.send(("exit",))
                except OSError:  # that worker is gone already
                    pass
        deadline = time.monotonic() + 10.0
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            try:  # a worker exits only once what it queued is read
                self.results.get(timeout=0.1)
            except queue.Empty:
                pass
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5.0)
        self.results.close()

    def _get(self, timeout: float) -> tuple[str, int, Any]:
        try:
            kind, wid, payload = self.results.get(timeout=timeout)
        except queue.Empty:
            dead = [p.name for p in self.procs if not p.is_alive()]
            raise LoadError(f"no word from the client processes in {timeout:.0f} s"
                            + (f" ({', '.join(dead)} exited)" if dead else "")) from None
        if kind == "error":
            raise LoadError(f"client process {wid}: {payload}")
        return kind, wid, payload

    def measure(self, concurrency: int, images_per_call: int, cfg: MeasureConfig,
                boundary: Callable[[], Any] | None = None) -> tuple[Any, list[Any]]:
        """`concurrency` of the workers as closed-loop clients: warm-up, windows until 3 agree within
        cfg.stability or cfg.max_windows, as measure_sync / measure_async; returns (Measurement, snapshots
        at every window boundary)."""
        if not 1 <= concurrency <= len(self.procs):
            raise ValueError(f"concurrency {concurrency}: this load has {len(self.procs)} client processes")
        active = range(concurrency)
        start = time.perf_counter() + START_DELAY_S
        for w in active:
            self.commands[w].send(("run", start))
        run = _Collector(self, concurrency)
        out = run.windows(start, images_per_call, cfg, boundary)  # on an error, close() ends the workers
        for w in active:
            self.commands[w].send(("stop",))
        run.until_stopped()
        return out


class _Collector:
    """Records from the active workers, in completion order per worker, and how far each has reported."""

    def __init__(self, load: ProcessLoad, concurrency: int):
        self.load, self.n = load, concurrency
        self.records: list[tuple[float, float, int]] = []  # (completion time, latency, worker)
        self.seen = [float("-inf")] * concurrency
        self.calls = [0] * concurrency

    def _take(self, timeout: float) -> None:
        kind, wid, (seen, recs) = self.load._get(timeout)
        self.records += [(e, lat, wid) for e, lat in recs]
        self.calls[wid] += len(recs)
        self.seen[wid] = seen

    def until(self, t: float) -> None:
        """Wait until every active worker has reported every call it completed before `t`."""
        while min(self.seen) < t:
            self._take(READY_TIMEOUT_S)

    def until_stopped(self) -> None:
        while min(self.seen) < float("inf"):
            self._take(READY_TIMEOUT_S)

    def between(self, t0: float, t1: float) -> list[tuple[float, float, int]]:
        return [r for r in self.records if t0 <= r[0] < t1]

    def windows(self, start: float, images_per_call: int, cfg: MeasureConfig,
                boundary: Callable[[], Any] | None) -> tuple[Any, list[Any]]:
        time.sleep(max(0.0, start + cfg.warmup_s - time.perf_counter()))
        while not any(self.calls):  # at least one answer before measuring
            self._take(READY_TIMEOUT_S)
        snaps = [boundary() if boundary else None]
        t0 = time.perf_counter()
        windows: list[Window] = []
        per_client: list[np.ndarray] = []  # calls of each client in each window
        while len(windows) < cfg.max_windows:
            t1 = t0 + cfg.window_s
            while True:  # a window is extended until it holds min_calls completed calls
                time.sleep(max(0.0, t1 - time.perf_counter()))
                snap = boundary() if boundary else None
                self.until(t1)
                done = self.between(t0, t1)
                if len(done) >= cfg.min_calls:
                    break
                t1 = time.perf_counter() + max(0.01, cfg.window_s / 10)
            snaps.append(snap)
            windows.append(Window(t1 - t0, len(done), len(done) * images_per_call, [r[1] for r in done]))
            per_client.append(np.bincount([r[2] for r in done], minlength=self.n))
            self.records = [r for r in self.records if r[0] >= t1]
            t0 = t1
            if is_stable(windows, cfg.stability):
                break
        m = summarise(windows, images_per_call, is_stable(windows, cfg.stability), self.n)
        calls = sum(per_client[-N_STABLE:])  # over the reported windows, as the figures
        m.load = {"generator": "processes", "client_processes": self.n,
                  "calls_per_client_min": int(calls.min()), "calls_per_client_max": int(calls.max())}
        return m, snaps
