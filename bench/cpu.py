"""Where a served request's CPU goes: the CPU seconds (user + system, from /proc) of a server's processes, by part.

The API sweep snapshots them at every window boundary with Triton's statistics, so each cell reports the CPU
milliseconds per request of the launcher (the HTTP and gRPC fronts, the supervisor, the validation worker),
tritonserver itself (protocol, scheduling, the python backend's side of every call), the API models' stubs and the
graph models' stubs, and the cores the server kept busy. On a machine whose cores are all busy, the sum per request
bounds the rate: cores / (CPU seconds per request). Linux only (None elsewhere).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from biva_core.contract import FRONT_GRAPHS, GRAPHS

CPU_KEY = "_cpu"  # the key of tree_cpu's reading in a snapshot of Triton's statistics
PARTS = ("fronts", "tritonserver", "api_stubs", "graph_stubs")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_STUB = "triton_python_backend_stub"


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... utime(12) stime(13)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _part(pid: int, root: int) -> str | None:
    """Which part of the server process `pid` is: the launcher and its helpers, Triton, or a model's stub."""
    if pid == root:
        return "fronts"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not argv or not argv[0]:
        return None
    if argv[0].endswith(_STUB.encode()) and len(argv) > 1:
        model = Path(argv[1].decode(errors="replace")).parent.parent.name  # .../<model>/<version>/model.py
        return "graph_stubs" if model in GRAPHS else "api_stubs" if model in FRONT_GRAPHS else "tritonserver"
    return "tritonserver" if Path(argv[0].decode(errors="replace")).name == "tritonserver" else "fronts"


def tree_cpu(root: int) -> dict | None:
    """A reading of every live process under `root` (root included): {"t": monotonic time, "pids": {pid: (part,
    CPU seconds so far)}}. The supervisor replaces stubs (a memory recycle, a death), so readings are compared per
    process (cpu_per_request): one that started between two readings counts from zero, one that exited loses
    what it used after the first (an undercount of its last moments, never a negative)."""
    if not Path("/proc/self/stat").exists():
        return None
    t = time.monotonic()
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (s := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    pids = {}
    todo = [root] if root in stats else []
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        part = _part(pid, root)
        if part is not None:
            pids[pid] = (part, stats[pid][1])
    return {"t": t, "pids": pids}


def cpu_per_request(before: dict | None, after: dict | None, requests: int) -> dict[str, float] | None:
    """CPU milliseconds per request of each part between two readings (per process: see tree_cpu), their sum, and
    the cores the server kept busy (CPU seconds per second)."""
    if not before or not after or requests <= 0:
        return None
    d = dict.fromkeys(PARTS, 0.0)
    for pid, (part, cpu) in after["pids"].items():
        was = before["pids"].get(pid)
        d[part] += cpu - (was[1] if was and was[0] == part else 0.0)
    out = {f"{p}_ms": d[p] * 1e3 / requests for p in PARTS}
    out["server_ms"] = sum(d.values()) * 1e3 / requests
    out["server_cores"] = sum(d.values()) / max(1e-9, after["t"] - before["t"])
    return out
