"""The supervisor: watches the python-backend stubs of one tritonserver and cleans up after it.

Triton 2.51's python backend does not restart a stub that died (a request it could not allocate, an
out-of-memory kill): that model answers "Stub process ... is not healthy" for good while the ready
endpoints keep answering 200. The supervisor's own thread finds the server's stubs (children of the server whose
command line names a model.py and a shared-memory region) and holds a pidfd for each INSTANCE stub (Triton names
them MODEL_GROUP_INDEX); the stub Triton runs for a moment on every load to complete the model's config is named
MODEL and is not watched. An instance stub that exits when the supervisor did not cause it (by an unload, a
recycle or a kill) has died: at once (the pidfd is readable the moment it exits) the model, and the API models that
call it, are not ready (the HTTP front answers 503 on its ready endpoints, and on the server's; the gRPC front
answers ready: false); the model's other stubs are expected to exit, and one reload (unload, load, through Triton's
repository API: explicit model control, restricted to the launcher's secret header) is queued. The model is ready
again when that load returned. A reload that fails leaves the model not ready and is queued again every `retry_s`.

One owner: every piece of state below is read and written only by the supervisor's thread, an asyncio loop that
runs one Triton call at a time (reloads, recycles, statistics) on one worker thread, so no two repository calls
overlap, and handles stub exits and scans between them. The launcher's event loop only reads `not_ready`, an
immutable set of models that the supervisor's thread publishes by assignment. Nothing waits for a guessed time.

Memory: Triton 2.51's python backend never shrinks a stub's shared-memory pool, and it and Triton keep the pages
a large request touched, so memory that a burst of large requests took stays taken. Every `memory_every_s` the
supervisor sums each model's instance stubs' proportional memory (PSS: shared pages counted once); a model holding
more than `memory_slack_mb` per stub over what it held after loading, and idle for `idle_s` (its inference count
unchanged), is loaded again, which Triton does beside the serving version (it stays ready); the old version's stubs
are expected to exit, and any still alive `grace_s` after the load are killed once not at work.

At work: Triton counts a request when it ends, so a model in the middle of a long request looks idle by its counts;
each stub also holds a lock while it executes (inflight.InFlight, in the cancel folder), and a model with a stub at
work is never loaded again for memory, and an old stub at work is never killed: it is left to finish its request.

The launcher's process is a child subreaper (prctl), so stubs orphaned by a server that went down are
reparented to it and reaped here: no zombies. Once the server is gone, the shared-memory regions of
every stub it ever had are removed from /dev/shm.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import queue
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from biva_core.contract import FRONT_GRAPHS
from biva_core.inflight import stub_busy

STUB_NAME = b"triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
PR_SET_CHILD_SUBREAPER = 36
TRACE_ENV = "BIVA_SUPERVISOR_TRACE"  # set: the log gets every stub watched or exited and what it meant


def become_subreaper() -> bool:
    """Orphaned descendants (a stub whose server died) are reparented to this process, which reaps them."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str  # the model's folder name (Triton model name)
    shm_region: str  # name under /dev/shm
    name: str = ""  # Triton's stub name: MODEL_GROUP_INDEX for an instance, MODEL for a config's auto-complete

    @property
    def instance(self) -> bool:
        """An instance of the model (serves requests), not the stub a load runs to complete the config."""
        return self.name != self.model


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1])
    except (OSError, IndexError, ValueError):
        return None


def _stub_name(args: list[bytes], model: str) -> str:
    """The stub name in a stub's arguments: [stub, model.py, shm region, sizes..., parent pid, backend dir, ipc
    handle, NAME, 'DEFAULT'] (Triton 2.51)."""
    names = [os.fsdecode(a) for a in args[3:]]
    return next((n for n in reversed(names) if n == model or n.startswith(model + "_")), "")


def list_stubs(server_pid: int) -> dict[int, Stub]:
    """The live python-backend stubs whose parent is `server_pid`."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        st = _stat(pid)
        if st is None or st[1] != server_pid or st[0] == "Z":
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(cmd) > 2 and cmd[0].endswith(STUB_NAME) and cmd[1].endswith(b"model.py"):
            model = Path(os.fsdecode(cmd[1])).parent.parent.name
            out[int(pid)] = Stub(int(pid), model, os.fsdecode(cmd[2]), _stub_name(cmd, model))
    return out


def _pss_mb(pid: int) -> float:
    """A process's proportional memory (MB); 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def reap_children(on_exit: Callable[[int, int], None] = lambda pid, code: None) -> None:
    """Reap every exited child (stubs reparented to us included); `on_exit(pid, returncode)` for each."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        on_exit(pid, os.waitstatus_to_exitcode(status))


@dataclass(frozen=True)
class Settings:
    reload: bool = True  # False when the server runs without explicit model control: a death stays not ready
    cancel_dir: str | None = None  # where the stubs mark themselves at work (inflight.InFlight); None: no marks
    poll_s: float = 0.5  # how often the stubs are listed (to find the ones a load started; exits come by pidfd)
    retry_s: float = 10.0  # a failed reload is tried again after this
    grace_s: float = 3.0  # an old stub still alive this long after its model loaded again is killed, once not at work
    memory_slack_mb: float = 32.0  # a model holding this much more per stub than after loading is recycled once idle
    memory_every_s: float = 2.0
    idle_s: float = 2.0


class Triton:
    """Triton's restricted HTTP API, blocking calls (run on the supervisor's worker thread only)."""

    def __init__(self, admin_url: str, secret: tuple[str, str]):
        self.url, self.headers = admin_url, {secret[0]: secret[1]}

    def call(self, path: str, timeout: float, method: str = "POST", body: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"{self.url}{path}", data=(body or b"{}") if method == "POST" else None,
                                     method=method, headers={**self.headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""
        except (urllib.error.URLError, OSError):
            return 0, b""

    def ready(self) -> bool:
        return self.call("/v2/health/ready", 5, "GET")[0] == 200

    def config(self, model: str) -> dict | None:
        code, body = self.call(f"/v2/models/{model}/config", 5, "GET")
        with contextlib.suppress(ValueError):
            return json.loads(body) if code == 200 else None
        return None

    def inference_counts(self) -> dict[str, int]:
        """Each model's inference count (Triton's statistics); {} on failure."""
        code, body = self.call("/v2/models/stats", 5, "GET")
        try:
            stats = json.loads(body) if code == 200 else {}
        except ValueError:
            return {}
        return {m["name"]: int(m.get("inference_count", 0)) for m in stats.get("model_stats", [])}

    def load(self, model: str, config: dict | None = None) -> bool:
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode() if config else None
        return self.call(f"/v2/repository/models/{model}/load", 300, body=body)[0] == 200

    def unload(self, model: str) -> None:
        self.call(f"/v2/repository/models/{model}/unload", 120)


@dataclass
class _Watched:
    stub: Stub
    fd: int | None  # its pidfd (None where pidfds are not available: the scan sees the exit)


@dataclass
class _Memory:
    """What the memory watch remembers per model."""

    baseline_mb: dict[str, float] = field(default_factory=dict)  # its stubs' PSS after loading
    activity: dict[str, tuple[int, float]] = field(default_factory=dict)  # (inference count, since when)
    base_count: dict[str, int] = field(default_factory=dict)  # its inference count when loaded


class Supervisor:
    """Start with `start()`; `not_ready(model)` from any thread; `stop()`, then `cleanup()` once the server exited."""

    def __init__(self, server_pid: int, admin_url: str, secret: tuple[str, str], settings: Settings = Settings(),
                 log: Callable[[str], None] = print):
        self.server_pid, self.settings, self.log = server_pid, settings, log
        self.triton = Triton(admin_url, secret)
        self.regions: set[str] = set()  # only grows; every stub's shared-memory region, for cleanup()
        self.reloads = 0  # reloads queued (one per death), for tests and the log
        self.recycled = 0  # memory recycles decided
        self._published: frozenset[str] | None = None  # the not-ready models; None: not watching yet (all not ready)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # the supervisor's thread only, from here on
        self._watched: dict[int, _Watched] = {}  # instance stubs: pid -> stub, pidfd
        self._expected: set[int] = set()  # watched stubs whose exit the supervisor caused (unload, recycle, kill)
        self._recovering: set[str] = set()  # models with a death not yet reloaded
        self._ops: deque[tuple[str, str]] = deque()  # ("reload" | "recycle", model), one at a time, in order
        self._running: tuple[str, str] | None = None
        self._loading: str | None = None  # the model whose load is in flight
        self._fresh: set[int] = set()  # stubs first seen during that load: judged by its outcome
        self._fresh_exited: set[int] = set()  # those of them that exited before it returned
        self._woken: asyncio.Event | None = None  # an operation was queued
        self._stopping: asyncio.Event | None = None
        self._memory = _Memory()
        self._pidfds = hasattr(os, "pidfd_open")
        self._trace = bool(os.environ.get(TRACE_ENV))

    def _say(self, message: str) -> None:
        if self._trace:
            self.log(f"biva supervisor trace {time.monotonic():.2f}: {message}")

    # ---- any thread ----------------------------------------------------------------------------------------------

    def not_ready(self, model: str | None) -> bool:
        """Whether a ready endpoint must say no: every one until the supervisor watches the stubs; then the
        server's (model None) while any model has a death not yet reloaded, a model's while it or a graph it
        calls has. Reads what the supervisor's thread published: no work here."""
        bad = self._published
        if bad is None:
            return True
        if model is None:
            return bool(bad)
        return model in bad or not bad.isdisjoint(FRONT_GRAPHS.get(model, ()))

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._main, name="biva-supervisor", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """The server is going down: its stubs' exits are no deaths. Returns at once."""
        self._stop.set()
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(stopping.set)

    def cleanup(self) -> list[str]:
        """After the server exited: stop watching, and remove the shared-memory regions of every stub it had."""
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        removed = []
        for name in sorted(self.regions):
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / name).unlink()
                removed.append(name)
        return removed

    # ---- the supervisor's thread ---------------------------------------------------------------------------------

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._woken, self._stopping = asyncio.Event(), asyncio.Event()
        self._loop = loop
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._worker, args=(self._calls,), name="biva-supervisor-triton", daemon=True).start()
        try:
            loop.run_until_complete(self._supervise())
        finally:
            self._calls.put(None)
            for pid in list(self._watched):
                self._unwatch(pid)
            loop.close()

    @staticmethod
    def _worker(calls: queue.SimpleQueue) -> None:
        """Runs the Triton calls one at a time, in the order asked."""
        while (item := calls.get()) is not None:
            fn, args, done = item
            try:
                result = fn(*args)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                result = e
            done(result)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the worker thread (one Triton call at a time); this loop goes on meanwhile."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(result: Any) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))
        self._calls.put((fn, args, done))
        result = await fut
        if isinstance(result, Exception):
            raise result
        return result

    async def _wait(self, seconds: float) -> bool:
        """Sleep, or less when stopping; whether stopping."""
        if not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stop.is_set()

    async def _supervise(self) -> None:
        while not await self._call(self.triton.ready):  # stubs that exit while the models load are not deaths
            if await self._wait(0.2):
                return
        self._scan()
        self._publish()  # watching: ready endpoints follow the stubs from now on
        tasks = [asyncio.create_task(self._operate())]
        if self.settings.reload:
            tasks.append(asyncio.create_task(self._watch_memory()))
        scan_s = self.settings.poll_s if self._pidfds else min(self.settings.poll_s, 0.05)
        while not await self._wait(scan_s):
            self._scan()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _publish(self) -> None:
        self._published = frozenset(self._recovering)

    def _scan(self) -> None:
        """List the stubs: watch the instance stubs not yet watched; a watched one no longer listed has exited."""
        live = list_stubs(self.server_pid)
        self.regions |= {s.shm_region for s in live.values()}
        for pid in [p for p in self._watched if p not in live]:
            self._exited(pid)
        for pid, stub in live.items():
            if stub.instance and pid not in self._watched:
                self._watch(stub)

    def _watch(self, stub: Stub) -> None:
        fd = None
        if self._pidfds:
            try:
                fd = os.pidfd_open(stub.pid)
            except ProcessLookupError:
                return  # gone already, before it was ever watched
            except OSError:
                self._pidfds = False  # not on this kernel: the scans see exits
            st = _stat(str(stub.pid))
            if st is None or st[1] != self.server_pid:  # the pid was reused between the scan and the pidfd
                if fd is not None:
                    os.close(fd)
                return
        self._watched[stub.pid] = _Watched(stub, fd)
        if stub.model == self._loading:
            self._fresh.add(stub.pid)
        self._say(f"watching {stub.name} (pid {stub.pid}){' started by the load in flight' * (stub.pid in self._fresh)}")
        if fd is not None:
            self._loop.add_reader(fd, self._exited, stub.pid)

    def _unwatch(self, pid: int) -> _Watched | None:
        w = self._watched.pop(pid, None)
        if w is not None and w.fd is not None:
            self._loop.remove_reader(w.fd)
            os.close(w.fd)
        return w

    def _exited(self, pid: int) -> None:
        """A watched instance stub exited (its pidfd, or a scan): expected, or a death."""
        w = self._unwatch(pid)
        if w is None:
            return
        meaning = ("expected" if pid in self._expected else "the load in flight decides" if pid in self._fresh
                   else "server stopping" if self._stop.is_set() else "a death")
        self._say(f"{w.stub.name} (pid {pid}) exited: {meaning}")
        if pid in self._expected:
            self._expected.discard(pid)
        elif pid in self._fresh:
            self._fresh_exited.add(pid)
        elif not self._stop.is_set():
            self._died(w.stub)

    def _died(self, stub: Stub) -> None:
        """Not ready now; the model's other stubs are expected to go with its unload; one reload queued."""
        model = stub.model
        if model in self._recovering and (("reload", model) in self._ops or not self.settings.reload):
            return  # the reload already queued replaces every stub of the model (or none will)
        self._recovering.add(model)
        self._publish()
        self._expected |= self._stubs_of(model)
        if not self.settings.reload:
            self.log(f"biva supervisor: a python-backend stub of {model} ({stub.name}) died; {model} stays not "
                     "ready (no explicit model control to reload it)")
            return
        self.log(f"biva supervisor: a python-backend stub of {model} ({stub.name}) died; reloading {model}")
        self.reloads += 1
        self._queue("reload", model)

    def _stubs_of(self, model: str) -> set[int]:
        return {pid for pid, w in self._watched.items() if w.stub.model == model}

    def _queue(self, kind: str, model: str) -> None:
        """Queue an operation; a reload goes before every recycle (a model is down), and replaces its model's."""
        if (kind, model) in self._ops:
            return
        if kind == "reload":
            with contextlib.suppress(ValueError):
                self._ops.remove(("recycle", model))
            self._ops.insert(sum(k == "reload" for k, _ in self._ops), (kind, model))
        else:
            self._ops.append((kind, model))
        self._woken.set()

    async def _operate(self) -> None:
        """The queued reloads and recycles, one at a time: no two Triton loads overlap."""
        while True:
            await self._woken.wait()
            self._woken.clear()
            while self._ops and not self._stop.is_set():
                self._running = self._ops.popleft()
                kind, model = self._running
                self._say(f"{kind} of {model} starts")
                try:
                    await (self._reload(model) if kind == "reload" else self._recycle(model))
                except Exception as e:  # noqa: BLE001 - the supervisor goes on
                    self.log(f"biva supervisor: {kind} of {model} failed: {e!r}")
                finally:
                    self._running = None

    async def _load(self, model: str, old: set[int], config: dict | None = None) -> tuple[bool, set[int]]:
        """Load `model` (its `old` stubs already expected to exit); whether it loaded, and its new stubs. A stub
        the load started that exited before the load returned is part of a failed load, or a death if it loaded."""
        self._loading, self._fresh, self._fresh_exited = model, set(), set()
        try:
            loaded = await self._call(self.triton.load, model, config)
            self._scan()
        finally:
            exited, self._loading, self._fresh, self._fresh_exited = self._fresh_exited, None, set(), set()
        new = self._stubs_of(model) - old
        self._say(f"load of {model}: {'loaded' if loaded else 'failed'}; old {sorted(old)}, new {sorted(new)}, "
                  f"exited during it {sorted(exited)}")
        if not loaded:
            self._expected |= new  # the failed load's stubs go with it
        elif exited:
            self._died(self._lost(model, min(exited)))
        return loaded, new

    @staticmethod
    def _lost(model: str, pid: int) -> Stub:
        return Stub(pid, model, "", f"pid {pid}")

    async def _reload(self, model: str) -> None:
        """Unload and load `model`, up to 3 tries; ready again once loaded. Failing, it stays not ready and is
        queued again after `retry_s`."""
        for attempt in range(3):
            old = self._stubs_of(model)
            self._expected |= old  # the unload stops them
            await self._call(self.triton.unload, model)
            loaded, new = await self._load(model, old)
            if loaded:
                self.log(f"biva supervisor: {model} reloaded")
                self._loaded(model, old, new)
                if ("reload", model) not in self._ops:  # no death of its new stubs meanwhile
                    self._recovering.discard(model)
                    self._publish()
                return
            if await self._wait(1.0 + attempt):
                return
        self.log(f"biva supervisor: reloading {model} failed; it stays not ready, next try in "
                 f"{self.settings.retry_s:g} s")
        self._loop.call_later(self.settings.retry_s, self._queue, "reload", model)

    async def _recycle(self, model: str) -> None:
        """Load `model` again beside its serving version (with its own config as the load's config, one parameter
        counting the recycles added, which makes Triton load it anew: a load of an unchanged model does nothing);
        its old stubs are expected to exit."""
        old = self._stubs_of(model)
        if model in self._recovering or any(stub_busy(self.settings.cancel_dir, pid) for pid in old):
            return  # died meanwhile (the reload replaces it), or at work since the decision
        config = await self._call(self.triton.config, model)
        if config is None:
            return
        config.setdefault("parameters", {})["biva_recycled"] = {"string_value": str(self.recycled)}
        old = self._stubs_of(model)
        self._expected |= old  # Triton unloads the old version once the new one serves
        loaded, new = await self._load(model, old, config)
        if loaded and new:
            self._loaded(model, old, new)
            return
        # not loaded anew (a failed load leaves the serving version as it was): the old stubs still serve
        self._expected -= old
        gone = old - set(self._watched)
        if gone and model not in self._recovering:  # an old stub exited during a load that replaced nothing
            self._died(self._lost(model, min(gone)))

    def _loaded(self, model: str, old: set[int], new: set[int]) -> None:
        """`model` serves from `new`: its memory from now on is measured against theirs; the old stubs that outlive
        the grace period are killed."""
        self._memory.baseline_mb[model] = sum(_pss_mb(pid) for pid in new)
        self._memory.base_count.pop(model, None)  # read again at the next watch
        if old:
            self._loop.call_later(self.settings.grace_s, self._kill_leftovers, model, old)

    def _kill_leftovers(self, model: str, old: set[int]) -> None:
        """Kill the old stubs still alive (expected: their exit is no death), but not one at work: it finishes its
        request first (Triton routes new ones to the new stubs), and is looked at again in 0.5 s."""
        busy = set()
        for pid in old:
            w = self._watched.get(pid)
            if w is None or pid not in self._expected:
                continue
            if stub_busy(self.settings.cancel_dir, pid):
                busy.add(pid)
                continue
            with contextlib.suppress(ProcessLookupError):
                if w.fd is not None:
                    signal.pidfd_send_signal(w.fd, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
                self.log(f"biva supervisor: killed an old stub of {model} (pid {pid}) that outlived its unload")
        if busy and not self._stop.is_set():
            self._loop.call_later(0.5, self._kill_leftovers, model, busy)

    async def _watch_memory(self) -> None:
        """A first look at once (each model's memory and count as loaded, before any request), then every
        `memory_every_s`."""
        while True:
            counts = await self._call(self.triton.inference_counts)
            if not counts:
                self._say("memory: no statistics from Triton")
            self._recycle_memory(counts)
            if await self._wait(self.settings.memory_every_s):
                return

    def _recycle_memory(self, counts: dict[str, int]) -> list[str]:
        """Queue a recycle for each model whose memory grew past its slack and that is idle; returns those."""
        mem, now, out = self._memory, time.monotonic(), []
        pending = {m for _, m in self._ops} | ({self._running[1]} if self._running else set())
        lingering = {self._watched[pid].stub.model for pid in self._expected if pid in self._watched}
        models = sorted({w.stub.model for w in self._watched.values()})
        for model in models:
            if model in self._recovering or model in pending or model in lingering or model not in counts:
                continue
            pids = self._stubs_of(model)
            if any(stub_busy(self.settings.cancel_dir, pid) for pid in pids):
                mem.activity[model] = (counts[model], now)  # at work: idle only from when it stops
                continue
            mb = sum(_pss_mb(pid) for pid in pids)
            base = mem.baseline_mb.setdefault(model, mb)
            if mem.base_count.setdefault(model, counts[model]) == counts[model]:  # no request since loading: what
                mem.baseline_mb[model] = base = max(base, mb)  # it grew by is the stubs settling, not a burst
            seen = mem.activity.get(model)
            self._say(f"memory of {model}: {mb:.1f} MB in {len(pids)} stubs, {base:.1f} after loading; count "
                      f"{counts[model]}, idle {now - seen[1] if seen and seen[0] == counts[model] else 0:.1f} s")
            if seen is None or seen[0] != counts[model]:
                mem.activity[model] = (counts[model], now)
            elif mb > base + self.settings.memory_slack_mb * len(pids) and now - seen[1] >= self.settings.idle_s:
                self.log(f"biva supervisor: {model} holds {mb:.0f} MB, {base:.0f} MB after loading; idle, so "
                         "loading it again to give the memory back")
                self.recycled += 1
                self._queue("recycle", model)
                out.append(model)
        return out
