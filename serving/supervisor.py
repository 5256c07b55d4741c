"""The supervisor: watches the python-backend stubs of one tritonserver and cleans up after it.

Triton 2.51's python backend does not restart a stub that died (a request it could not allocate, an
out-of-memory kill): that model answers "Stub process ... is not healthy" for good while the ready
endpoints keep answering 200. Every `poll_s`, and whenever a front asks whether something is ready (at most
every 50 ms), the supervisor lists the server's stub processes (children of the server whose command line names
a model.py and a shared-memory region); when one has died it marks the model not ready (the HTTP front answers
503 on its ready endpoints, and on the server's; the gRPC front answers ready: false), unloads it and loads it
again through Triton's repository API (explicit model control, restricted to the launcher's secret header), then
marks it ready. The stubs the model had when it died are retiring: Triton stops them as it unloads the old
version, which is not a death to recover from, and any of them still alive a few seconds after the reload is
killed. A reload that fails leaves the model not ready and is tried again every `retry_s`.

Memory: Triton 2.51's python backend never shrinks a stub's shared-memory pool, and it and Triton keep the pages
a large request touched, so memory that a burst of large requests took stays taken. Every `memory_every_s` the
supervisor sums each model's stubs' proportional memory (PSS: shared pages counted once); a model holding more
than `memory_slack_mb` per stub over what it held after loading, and idle for `idle_s` (its inference count unchanged),
is loaded again, which Triton does beside the serving version (it stays ready), and its old stubs retire.

At work: Triton counts a request when it ends, so a model in the middle of a long request looks idle by its counts;
each stub also holds a lock while it executes (contract.InFlight, in the cancel folder), and a model with a stub at
work is never loaded again for memory, and an old stub at work is never killed: it is left to finish its request.

The launcher's process is a child subreaper (prctl), so stubs orphaned by a server that went down are
reparented to it and reaped here: no zombies. Once the server is gone, the shared-memory regions of
every stub it ever had are removed from /dev/shm.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from biva_core.contract import FRONT_GRAPHS, stub_busy

STUB_NAME = b"triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
PR_SET_CHILD_SUBREAPER = 36


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


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1])
    except (OSError, IndexError, ValueError):
        return None


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
            out[int(pid)] = Stub(int(pid), model, os.fsdecode(cmd[2]))
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


@dataclass
class Supervisor:
    server_pid: int
    admin_url: str  # Triton's private HTTP endpoint, "http://127.0.0.1:PORT"
    secret: tuple[str, str]  # (header, value) for the restricted repository API
    poll_s: float = 0.5
    log: Callable[[str], None] = print
    reload: bool = True  # False when the server runs without explicit model control
    cancel_dir: str | None = None  # where the stubs mark themselves at work (contract.InFlight); None: no marks
    stubs: dict[int, Stub] = field(default_factory=dict)
    regions: set[str] = field(default_factory=set)
    recovering: set[str] = field(default_factory=set)
    retiring: dict[int, str] = field(default_factory=dict)  # a reloading model's old stubs (pid -> model): expected
    #                                                          to exit
    loading: set[str] = field(default_factory=set)  # models with a load in flight: their stubs come and go (Triton
    #                                                 runs a stub to complete the config) without a death
    armed: bool = False  # set once the server is ready: stubs that exit while models load are not deaths
    retry_s: float = 10.0  # a failed reload is tried again after this
    grace_s: float = 3.0  # a retiring stub still alive this long after its model reloaded is killed, once not at work
    reloads: int = 0  # reloads started, for tests and the log
    memory_slack_mb: float = 32.0  # a model holding this much more per stub than after loading is recycled once idle
    memory_every_s: float = 2.0
    idle_s: float = 2.0
    recycled: int = 0  # memory recycles started
    baseline_mb: dict[str, float] = field(default_factory=dict)  # model -> its stubs' PSS after loading
    _activity: dict[str, tuple[int, float]] = field(default_factory=dict)  # model -> (inference count, since when)
    _base_count: dict[str, int] = field(default_factory=dict)  # model -> its inference count when loaded
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last: float = 0.0

    def not_ready(self, model: str | None) -> bool:
        """Whether a ready endpoint must say no: every one until the supervisor watches the stubs; then the
        server's (model None) while any model reloads, a model's while it or a graph it calls reloads. Looks at
        the stubs first (at most every 50 ms), so a death is seen before the next poll."""
        if self.armed and time.monotonic() - self._last > 0.05:
            self.check()
        if not self.armed:  # not watching yet: a stub death now would go unnoticed
            return True
        bad = set(self.recovering)
        if model is None:
            return bool(bad)
        return model in bad or bool(bad & set(FRONT_GRAPHS.get(model, ())))

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, name="biva-supervisor", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        next_memory = 0.0
        while not self._stop.wait(self.poll_s):
            self.check()
            if self.armed and self.reload and time.monotonic() >= next_memory:
                next_memory = time.monotonic() + self.memory_every_s
                self.watch_memory()

    def watch_memory(self) -> list[str]:
        """Recycle the models whose memory grew past their slack and that are idle; returns those models."""
        with self._lock:
            stubs = dict(self.stubs)
            busy = self.recovering | set(self.retiring.values())
        held: dict[str, float] = {}
        count: dict[str, int] = {}
        for pid, s in stubs.items():
            held[s.model] = held.get(s.model, 0.0) + _pss_mb(pid)
            count[s.model] = count.get(s.model, 0) + 1
        counts, now, out = self._inference_counts(), time.monotonic(), []
        for model, mb in sorted(held.items()):
            if model in busy or model not in counts:
                continue
            if any(s.model == model and stub_busy(self.cancel_dir, pid) for pid, s in stubs.items()):
                self._activity[model] = (counts[model], now)  # at work: idle only from when it stops
                continue
            base = self.baseline_mb.setdefault(model, mb)
            if self._base_count.setdefault(model, counts[model]) == counts[model]:  # no request since loading: what
                self.baseline_mb[model] = base = max(base, mb)  # it grew by is the stubs settling, not a burst
            seen = self._activity.get(model)
            if seen is None or seen[0] != counts[model]:
                self._activity[model] = (counts[model], now)
            elif mb > base + self.memory_slack_mb * count[model] and now - seen[1] >= self.idle_s:
                self.log(f"biva supervisor: {model} holds {mb:.0f} MB, {base:.0f} MB after loading; idle, so "
                         "loading it again to give the memory back")
                with self._lock:
                    self.retiring.update({pid: model for pid, s in self.stubs.items() if s.model == model})
                self.recycled += 1
                out.append(model)
                threading.Thread(target=self._recycle, args=(model,), daemon=True).start()
        return out

    def _recycle(self, model: str) -> None:
        """Load `model` again beside its serving version (with its own config as the load's config, one parameter
        counting the recycles added, which makes Triton load it anew: a load of an unchanged model does nothing);
        its old stubs retire."""
        config = self._config(model)
        if config is not None:
            config.setdefault("parameters", {})["biva_recycled"] = {"string_value": str(self.recycled)}
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode() if config else None
        self.loading.add(model)
        if body and self._post(f"/v2/repository/models/{model}/load", 300, body=body) == 200:
            self._retire(model)
        else:
            with self._lock:
                self.loading.discard(model)
                for pid in [p for p, m in self.retiring.items() if m == model]:
                    self.retiring.pop(pid)

    def _inference_counts(self) -> dict[str, int]:
        """Each model's inference count (Triton's statistics through the restricted API); {} on failure."""
        req = urllib.request.Request(f"{self.admin_url}/v2/models/stats", headers={self.secret[0]: self.secret[1]})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                stats = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        return {m["name"]: int(m.get("inference_count", 0)) for m in stats.get("model_stats", [])}

    def check(self) -> list[str]:
        """One scan: records the stubs, and reloads the models whose stubs died; returns those models."""
        with self._lock:
            self._last = time.monotonic()
            live = list_stubs(self.server_pid)
            self.regions |= {s.shm_region for s in live.values()}
            if not self.armed:
                self.armed = self._get("/v2/health/ready") == 200
                self.stubs = live
                return []
            gone = {pid: s for pid, s in self.stubs.items() if pid not in live}
            dead = {s.model for pid, s in gone.items() if pid not in self.retiring and s.model not in self.loading}
            dead -= self.recovering
            for pid in gone:  # expected exits, now done
                self.retiring.pop(pid, None)
            self.stubs = live
            if self._stop.is_set():
                return []
            for model in sorted(dead):
                self.log(f"biva supervisor: a python-backend stub of {model} died; reloading {model}")
                self.recovering.add(model)
                self.retiring.update({pid: model for pid, s in live.items() if s.model == model})  # old version
                self.reloads += 1
                threading.Thread(target=self._reload, args=(model,), daemon=True).start()
            return sorted(dead)

    def _get(self, path: str) -> int:
        return self._post(path, 5, method="GET")

    def _config(self, model: str) -> dict | None:
        req = urllib.request.Request(f"{self.admin_url}/v2/models/{model}/config",
                                     headers={self.secret[0]: self.secret[1]})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _post(self, path: str, timeout: float, method: str = "POST", body: bytes | None = None) -> int:
        req = urllib.request.Request(f"{self.admin_url}{path}", data=(body or b"{}") if method == "POST" else None,
                                     method=method, headers={self.secret[0]: self.secret[1],
                                                             "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def _reload(self, model: str) -> None:
        """Unload and load `model` until it loads (not ready meanwhile), then kill its old stubs that outlive the
        grace period. Without explicit model control the model stays not ready."""
        while self.reload and not self._stop.is_set():
            for attempt in range(3):
                self.loading.add(model)
                self._post(f"/v2/repository/models/{model}/unload", 120)
                if self._post(f"/v2/repository/models/{model}/load", 300) == 200:
                    self.log(f"biva supervisor: {model} reloaded")
                    self._retire(model)
                    return
                time.sleep(1.0 + attempt)
            self.log(f"biva supervisor: reloading {model} failed; it stays not ready, next try in {self.retry_s:g} s")
            if self._stop.wait(self.retry_s):
                return

    def _retire(self, model: str) -> None:
        """The model serves again: count its new stubs as its stubs, mark it ready, and kill any old stub that is
        still alive after the grace period."""
        time.sleep(0.5)  # a stub Triton ran to complete the config is gone by now
        with self._lock:
            old = {pid for pid, m in self.retiring.items() if m == model}
            self.stubs = list_stubs(self.server_pid)
            self.baseline_mb[model] = sum(_pss_mb(pid) for pid, s in self.stubs.items()
                                          if s.model == model and pid not in old)  # the new stubs, fresh
            self._base_count.pop(model, None)  # read again at the next watch
            self.recovering.discard(model)
            self.loading.discard(model)
        if self._stop.wait(self.grace_s):
            return
        live = list_stubs(self.server_pid)
        if not any(s.model == model and pid not in old for pid, s in live.items()):
            with self._lock:  # no new stubs came up: the old ones are still the model's, never kill those
                for pid in old:
                    self.retiring.pop(pid, None)
            return
        left = old & set(live)
        while left:  # an old stub still at work finishes its request first (Triton routes new ones to the new stubs)
            for pid in [p for p in left if not stub_busy(self.cancel_dir, p)]:
                left.discard(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.log(f"biva supervisor: killed an old stub of {model} (pid {pid}) that outlived its unload")
            left &= set(list_stubs(self.server_pid))
            if left and self._stop.wait(0.5):
                return

    def cleanup(self) -> list[str]:
        """After the server exited: remove the shared-memory regions of every stub it had."""
        removed = []
        for name in sorted(self.regions):
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / name).unlink()
                removed.append(name)
        return removed
