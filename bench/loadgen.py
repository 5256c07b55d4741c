"""Closed-loop concurrent clients in separate processes, measured with bench/measure.py's rules.

The bench's first sweep ran every client as a coroutine of the bench process itself: one interpreter,
on one core at a time, beside the server. Here the clients run in their own processes (spawned, each
with its own tritonclient aio client per protocol: one gRPC channel, or one HTTP connection pool): one
process per client by default, as perf_analyzer's concurrency mode gives each client its own thread, or
fewer processes with several coroutine clients each (`procs`). Each client sends its next request when the
previous answer arrives; a busy answer (the fronts' queue is full) is sent again after the wait it asks for, as
biva_client does. A load holds one or more targets (model, request bodies, gRPC or HTTP), and each level sends
to one of them, so a sweep over several API requests and both protocols starts its processes once.

    controller (this process)                    client process w (spawned)
    start the processes  --------------------->  connect, one untimed call per target, "ready"
    ("run", start, clients, target)  --------->  at the start time, its clients call the target back to back;
                                                 every FLUSH_S it sends (completion time, latency,
    windows by the controller's clock, server    client) records and "seen up to" the flush time
    snapshot at every boundary; a window is
    counted once every process has reported
    past its end
    ("stop")  -------------------------------->  finish the calls in flight, "stopped" with its CPU
                                                 seconds, calls and busy answers over the level

Completion times and windows share one clock: time.perf_counter is CLOCK_MONOTONIC on Linux, the same in
every process. The processes live for a whole sweep: a level runs its first N clients, so a sweep to 64
clients starts its processes once.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from biva_core.contract import wire_type

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
        t = client_mod.InferInput(name, list(a.shape), wire_type(a))
        t.set_data_from_numpy(a)
        body.append(t)
    return body


@dataclass(frozen=True)
class Target:
    """What a load's clients send: POOL-style request inputs (rotated) to `model` at `url` over `protocol`
    ("grpc" or "http"), asking for `outputs` (binary over HTTP; empty: every output)."""

    url: str
    model: str
    bodies: list[dict[str, np.ndarray]]
    protocol: str = "grpc"
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


PROTOCOLS = ("grpc", "http")


def busy_wait(exc: BaseException) -> float | None:
    """The seconds a user's client waits before sending again after `exc` (a busy answer: HTTP 429, a full
    queue, the fronts' "busy:" refusals, as biva_client.api classifies them), or None for any other error."""
    from tritonclient.utils import InferenceServerException

    from biva_client.api import _busy, _retry_after

    if not isinstance(exc, InferenceServerException):
        return None
    msg = (exc.message() or str(exc)).splitlines()[0] if (exc.message() or str(exc)) else ""
    return _retry_after(msg) if _busy(str(exc.status() or ""), msg) else None


def _worker(wid: int, targets: list[Target], procs: int, commands, results) -> None:
    """Client process `wid` of `procs`: clients wid, wid + procs, ... as coroutines sharing one
    tritonclient aio client (one gRPC channel, or one HTTP connection pool) per protocol."""
    import asyncio

    try:
        asyncio.run(_worker_main(wid, targets, procs, commands, results))
    except Exception as exc:  # reported to the controller, which raises it
        results.put(("error", wid, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


class _Sender:
    """One target's calls from one process: its request bodies and outputs built once for its protocol."""

    def __init__(self, client, mod, target: Target):
        self.client, self.model = client, target.model
        self.inputs = [infer_inputs(mod, feeds) for feeds in target.bodies]
        http = target.protocol == "http"
        self.outputs = [mod.InferRequestedOutput(o, binary_data=True) if http else mod.InferRequestedOutput(o)
                        for o in target.outputs] or None

    async def __call__(self, i: int) -> None:
        await self.client.infer(self.model, self.inputs[i % len(self.inputs)], outputs=self.outputs)


async def _worker_main(wid: int, targets: list[Target], procs: int, commands, results) -> None:
    import asyncio

    import tritonclient.grpc.aio as grpc_aio
    import tritonclient.http.aio as http_aio

    mods = {"grpc": grpc_aio, "http": http_aio}
    clients: dict[tuple[str, str], Any] = {}
    try:
        senders = []
        for t in targets:
            if (t.protocol, t.url) not in clients:
                clients[t.protocol, t.url] = mods[t.protocol].InferenceServerClient(t.url)
            senders.append(_Sender(clients[t.protocol, t.url], mods[t.protocol], t))
        for send in senders:  # connected and answered once before any timing (a busy answer counts too)
            try:
                await send(0)
            except Exception as exc:
                if busy_wait(exc) is None:
                    raise
        results.put(("ready", wid, None))
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, commands.recv)
            if cmd[0] != "run":
                break
            _, start, clients_n, target = cmd
            await _run(senders[target], [wid + procs * j for j in range(clients_n)], start, commands, results, wid)
    finally:
        for c in clients.values():
            await c.close()


async def _run(send: _Sender, ids: list[int], start: float, commands, results, wid: int) -> None:
    """Clients `ids` call back to back from `start` until "stop" arrives; records go out every FLUSH_S. A busy
    answer is retried after the wait it asks for, as biva_client does: the record's latency is the user's, from
    the first try to the answer, and the refusals are counted."""
    import asyncio

    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    records: list[tuple[float, float, int]] = []  # (completion time, latency, client)
    stop = asyncio.Event()
    cpu, calls, refused = time.process_time(), [0], [0]

    async def one(cid: int) -> None:
        i = cid
        while not stop.is_set():
            s = time.perf_counter()
            while True:
                try:
                    await send(i)
                    break
                except Exception as exc:
                    wait = busy_wait(exc)
                    if wait is None:
                        raise
                    refused[0] += 1
                    await asyncio.sleep(wait)
            e = time.perf_counter()
            records.append((e, e - s, cid))
            i += 1
            calls[0] += 1

    tasks = [asyncio.create_task(one(c)) for c in ids]
    while not commands.poll():
        await asyncio.sleep(FLUSH_S)
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()
        # every call completed by now is in `records`: the event loop runs one coroutine at a time
        results.put(("records", wid, (time.perf_counter(), records)))
        records = []
    commands.recv()  # the "stop"
    stop.set()
    await asyncio.gather(*tasks)
    # this process's CPU seconds (all its threads) over the level, its calls and the busy answers they met
    results.put(("stopped", wid, (float("inf"), records, time.process_time() - cpu, calls[0], refused[0])))


class ProcessLoad:
    """`clients` closed-loop clients in `procs` processes (0: one process per client), alive for one sweep (a
    context manager); each level sends to one of `targets` (models, request bodies, protocols)."""

    def __init__(self, targets: list[Target], clients: int, procs: int = 0):
        ctx = mp.get_context("spawn")  # not fork: the bench process holds torch's and gRPC's threads
        self.targets, self.clients, procs = list(targets), clients, min(procs or clients, clients)
        self.results = ctx.Queue()
        self.commands, self.procs = [], []
        for w in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(w, self.targets, procs, child, self.results), daemon=True,
                            name=f"biva-bench-client-{w}")
            p.start()
            self.commands.append(parent)
            self.procs.append(p)
        try:
            for _ in range(procs):
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
                boundary: Callable[[], Any] | None = None, target: int = 0) -> tuple[Any, list[Any]]:
        """The first `concurrency` clients, closed-loop, sending to targets[target]: warm-up, windows until 3
        agree within cfg.stability or cfg.max_windows, as measure_sync / measure_async; returns (Measurement,
        snapshots at every window boundary)."""
        if not 1 <= concurrency <= self.clients:
            raise ValueError(f"concurrency {concurrency}: this load has {self.clients} clients")
        if not 0 <= target < len(self.targets):
            raise ValueError(f"target {target}: this load has {len(self.targets)} targets")
        procs = len(self.procs)
        active = {w: len(range(w, concurrency, procs)) for w in range(min(procs, concurrency))}
        start = time.perf_counter() + START_DELAY_S
        for w, clients in active.items():
            self.commands[w].send(("run", start, clients, target))
        run = _Collector(self, list(active), concurrency)
        m, snaps = run.windows(start, images_per_call, cfg, boundary)  # on an error, close() ends the workers
        for w in active:
            self.commands[w].send(("stop",))
        run.until_stopped()
        m.load = {**m.load, "client_processes": len(active), "protocol": self.targets[target].protocol,
                  "client_cpu_us_per_call": run.cpu_s / run.level_calls * 1e6 if run.level_calls else None,
                  "busy_answers": run.refused,  # over the whole level, each retried after its Retry-After
                  "busy_per_call": run.refused / run.level_calls if run.level_calls else None}
        return m, snaps


class _Collector:
    """Records from the active client processes, and how far each process has reported."""

    def __init__(self, load: ProcessLoad, procs: list[int], clients: int):
        self.load, self.n = load, clients
        self.records: list[tuple[float, float, int]] = []  # (completion time, latency, client)
        self.seen = {w: float("-inf") for w in procs}
        self.cpu_s, self.level_calls, self.refused = 0.0, 0, 0

    def _take(self, timeout: float) -> None:
        kind, wid, (seen, recs, *usage) = self.load._get(timeout)
        if usage:  # the process stopped: CPU seconds, calls and busy answers over the whole level
            self.cpu_s += usage[0]
            self.level_calls += usage[1]
            self.refused += usage[2]
        self.records += recs
        self.seen[wid] = seen

    def until(self, t: float) -> None:
        """Wait until every active process has reported every call it completed before `t`."""
        while min(self.seen.values()) < t:
            self._take(READY_TIMEOUT_S)

    def until_stopped(self) -> None:
        self.until(float("inf"))

    def between(self, t0: float, t1: float) -> list[tuple[float, float, int]]:
        return [r for r in self.records if t0 <= r[0] < t1]

    def windows(self, start: float, images_per_call: int, cfg: MeasureConfig,
                boundary: Callable[[], Any] | None) -> tuple[Any, list[Any]]:
        time.sleep(max(0.0, start + cfg.warmup_s - time.perf_counter()))
        while not self.records:  # at least one answer before measuring
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
        m.load = {"generator": "processes", "calls_per_client_min": int(calls.min()),
                  "calls_per_client_max": int(calls.max())}
        return m, snaps


# ---- a neighbour: what the served model leaves to another process on the same cores ------------------

NEIGHBOUR_N = 256  # n of the neighbour's n x n x n fp32 matmul, one thread (like a 1-thread training run)


def _neighbour(counter, n: int) -> None:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    while True:
        a @ b
        with counter.get_lock():
            counter.value += 1


class Neighbour:
    """A 1-thread GEMM loop in its own process beside the server; `rate(since)` is its GFLOP/s since a
    `mark()`. Spinning ONNX Runtime threads take cores from such a process (measured: a training step
    slowed 10x+ next to a served model under load)."""

    def __init__(self, n: int = NEIGHBOUR_N):
        ctx = mp.get_context("spawn")
        self.n = n
        self.counter = ctx.Value("q", 0)
        self.proc = ctx.Process(target=_neighbour, args=(self.counter, n), daemon=True, name="biva-bench-neighbour")
        self.proc.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.counter.value < 3:  # torch imported and the loop running
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise LoadError("the neighbour process did not start")
            time.sleep(0.05)

    def mark(self) -> tuple[float, int]:
        return time.perf_counter(), self.counter.value

    def rate(self, since: tuple[float, int]) -> float:
        t, count = self.mark()
        return (count - since[1]) * 2 * self.n ** 3 / (t - since[0]) / 1e9

    def __enter__(self) -> Neighbour:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.join(timeout=5.0)
