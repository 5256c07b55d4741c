"""The supervisor: watches the python-backend stubs of one tritonserver and cleans up after it.

Triton 2.51's python backend does not restart a stub that died (a request it could not allocate, an
out-of-memory kill): that model answers "Stub process ... is not healthy" for good while the ready
endpoints keep answering 200. Every `poll_s` the supervisor lists the server's stub processes (children of
the server whose command line names a model.py and a shared-memory region); when one has died it marks
the model not ready (the HTTP front answers 503 on its ready endpoints, and on the server's; the gRPC front
answers ready: false), unloads it and loads it again through Triton's repository API (explicit model
control, restricted to the launcher's secret header), then marks it ready.

The launcher's process is a child subreaper (prctl), so stubs orphaned by a server that went down are
reparented to it and reaped here: no zombies. Once the server is gone, the shared-memory regions of
every stub it ever had are removed from /dev/shm.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from biva_core.contract import FRONT_GRAPHS

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
    stubs: dict[int, Stub] = field(default_factory=dict)
    regions: set[str] = field(default_factory=set)
    recovering: set[str] = field(default_factory=set)
    armed: bool = False  # set once the server is ready: stubs that exit while models load are not deaths
    _stop: threading.Event = field(default_factory=threading.Event)

    def not_ready(self, model: str | None) -> bool:
        """Whether a ready endpoint must say no: every one until the supervisor watches the stubs; then the
        server's (model None) while any model reloads, a model's while it or a graph it calls reloads."""
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
        while not self._stop.wait(self.poll_s):
            self.check()

    def check(self) -> list[str]:
        """One scan: records the stubs, and reloads the models whose stubs died; returns those models."""
        live = list_stubs(self.server_pid)
        self.regions |= {s.shm_region for s in live.values()}
        if not self.armed:
            self.armed = self._get("/v2/health/ready") == 200
            self.stubs = live
            return []
        dead = {s.model for pid, s in self.stubs.items() if pid not in live} - self.recovering
        self.stubs = live
        if self._stop.is_set():
            return []
        for model in sorted(dead):
            self.log(f"biva supervisor: a python-backend stub of {model} died; reloading {model}")
            self.recovering.add(model)
            threading.Thread(target=self._reload, args=(model,), daemon=True).start()
        return sorted(dead)

    def _get(self, path: str) -> int:
        return self._post(path, 5, method="GET")

    def _post(self, path: str, timeout: float, method: str = "POST") -> int:
        req = urllib.request.Request(f"{self.admin_url}{path}", data=b"{}" if method == "POST" else None,
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
        try:
            if not self.reload:
                return  # stays not ready: the server cannot load models
            for attempt in range(3):
                self._post(f"/v2/repository/models/{model}/unload", 120)
                if self._post(f"/v2/repository/models/{model}/load", 300) == 200:
                    self.stubs = {p: s for p, s in self.stubs.items() if s.model != model}
                    self.log(f"biva supervisor: {model} reloaded")
                    break
                time.sleep(1.0 + attempt)
            else:
                self.log(f"biva supervisor: reloading {model} failed; it stays not ready")
                return
        finally:
            if self.reload and not self._stop.is_set():
                self.recovering.discard(model)

    def cleanup(self) -> list[str]:
        """After the server exited: remove the shared-memory regions of every stub it had."""
        removed = []
        for name in sorted(self.regions):
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / name).unlink()
                removed.append(name)
        return removed
