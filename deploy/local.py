"""`biva-replicas`: N replicas of the project's `tritonserver` behind HAProxy on one machine, in one command.

    biva-replicas --repo triton_models --replicas 2 --http-port 8000 --grpc-port 8001

The local stand-in for the Kubernetes Deployment (deploy/k8s/base/deployment.yaml) and its L7 route, and a
deployment in its own right. Every fact about a replica comes from that YAML, read with pyyaml, not re-typed here:
the container's command and args (ports mapped to free loopback ports, addresses 0.0.0.0 -> 127.0.0.1, the models
mount -> --repo), its named ports, the readiness path HAProxy checks, the startup probe's budget, the preStop sleep
and terminationGracePeriodSeconds. What the kubelet does, this does too, per replica:

- restartPolicy Always: a replica that exits (crash, SIGKILL, a drain that finished) is started again, on the same
  ports, so HAProxy's static server lines stay valid; back-off 0 s, then 1, 2, 4, ... 10 s while starts fail.
- when a container's main process dies, the runtime kills the container's whole PID namespace. The local
  equivalent is the replica's process group: anything of it still alive `ORPHAN_GRACE_S` after the launcher
  died is SIGKILLed and recorded in `Replica.orphans_killed` (the launcher should have taken its Triton and stubs
  with it; the tests check that nothing needed killing).
- termination (rolling restart, shutdown): the endpoint leaves the route (HAProxy server state `maint`: no new
  requests, the ones in flight go on), the preStop sleep, SIGTERM, and SIGKILL to the group after the grace period.

The Python API (`LocalDeployment`) is what the CLI and tests/test_deploy_local.py use.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import click
import yaml

from biva_serving.net import LOOPBACK, LoopbackUrls, free_ports
from biva_serving.process import ServerHandle

DEPLOYMENT_YAML = Path(__file__).resolve().parent / "k8s" / "base" / "deployment.yaml"
CONTAINER = "tritonserver"
ORPHAN_GRACE_S = 15.0  # how long a dead launcher's group may take to exit on its own before it is killed
RESTART_BACKOFF_MAX_S = 10.0
# HAProxy's request buffer. A request is retried (retry-on other than conn-failure) only if it fits in ONE buffer
# (HAProxy 2.6, "retry-on": "Requests not fitting in a single buffer will never be retried"), headers included,
# less tune.maxrewrite (1 KiB). 256 KiB: every biva_sample / biva_regenerate request (under 1 KiB) and biva_score /
# biva_encode / biva_detect with up to about 80 28x28 images in binary HTTP (3,136 B each) or 25 in JSON are
# retried; larger scoring requests (up to the fronts' 64 MiB) pass through unbuffered beyond 256 KiB and are not
# retried by HAProxy (biva-client retries them: it sees the 502/503 or the reset). Memory: two buffers per
# connection, so MAXCONN x 512 KiB at most (128 MiB).
BUFSIZE = 256 * 1024
MAXCONN = 256


# ---- the Deployment's facts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    path: str
    port: str  # the container port's name
    period_s: float
    failure_threshold: int
    timeout_s: float


@dataclass(frozen=True)
class ContainerSpec:
    """What deploy/local.py reads from the Deployment's `tritonserver` container."""

    command: tuple[str, ...]
    args: tuple[str, ...]
    ports: dict[str, int]  # name -> containerPort
    readiness: Probe
    liveness: Probe
    startup: Probe | None
    grace_s: float  # terminationGracePeriodSeconds
    prestop_s: float  # the preStop `sleep N`, 0 without one
    env: dict[str, str]
    mounts: dict[str, str]  # volume name -> mountPath

    @property
    def exit_timeout_s(self) -> float:
        """The launcher's drain deadline: --exit-timeout-secs in the args (Triton's default 30 without it)."""
        for a in self.args:
            if a.startswith("--exit-timeout-secs="):
                return float(a.split("=", 1)[1])
        return 30.0

    @property
    def model_repository(self) -> str:
        for a in self.args:
            if a.startswith("--model-repository="):
                return a.split("=", 1)[1]
        raise ValueError("the container's args have no --model-repository")

    def start_budget_s(self) -> float:
        """How long the kubelet lets a replica start: the startup probe's period x failureThreshold."""
        p = self.startup or self.readiness
        return p.period_s * p.failure_threshold


def _probe(c: dict, key: str, ports: dict[str, int]) -> Probe | None:
    p = c.get(key)
    if not p:
        return None
    get = p["httpGet"]
    port = get["port"]
    if not isinstance(port, str):  # a number: name it
        port = next(name for name, number in ports.items() if number == int(port))
    return Probe(get["path"], port, float(p.get("periodSeconds", 10)), int(p.get("failureThreshold", 3)),
                 float(p.get("timeoutSeconds", 1)))


def load_container(path: Path | str = DEPLOYMENT_YAML, container: str = CONTAINER) -> ContainerSpec:
    """The `container` of the Deployment in `path` (the first Deployment document of the file)."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d and d.get("kind") == "Deployment"]
    if not docs:
        raise ValueError(f"{path}: no Deployment")
    pod = docs[0]["spec"]["template"]["spec"]
    c = next((c for c in pod["containers"] if c["name"] == container), None)
    if c is None:
        raise ValueError(f"{path}: no container named {container!r}")
    ports = {p["name"]: int(p["containerPort"]) for p in c.get("ports", [])}
    readiness, liveness = _probe(c, "readinessProbe", ports), _probe(c, "livenessProbe", ports)
    if readiness is None or liveness is None:
        raise ValueError(f"{path}: container {container!r} needs a readinessProbe and a livenessProbe (httpGet)")
    prestop = 0.0
    cmd = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command") or []
    if len(cmd) == 2 and cmd[0] == "sleep":
        prestop = float(cmd[1])
    env = {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    return ContainerSpec(tuple(c["command"]), tuple(str(a) for a in c.get("args", [])), ports, readiness, liveness,
                         _probe(c, "startupProbe", ports), float(pod.get("terminationGracePeriodSeconds", 30)),
                         prestop, env, mounts)


def replica_args(spec: ContainerSpec, repo: Path | str, ports: dict[str, int]) -> list[str]:
    """The container's args for a replica on this machine: each `--*-port=` naming a containerPort -> that port's
    local number (`ports`: name -> local port), each `--*-address=0.0.0.0` -> 127.0.0.1, the models mount ->
    `repo`; everything else as written."""
    local = {str(number): ports[name] for name, number in spec.ports.items()}
    mount = spec.model_repository
    out = []
    for a in spec.args:
        flag, eq, value = a.partition("=")
        if eq and flag.endswith("-port") and value in local:
            value = str(local[value])
        elif eq and flag.endswith("-address") and value in ("0.0.0.0", "::", "[::]"):
            value = LOOPBACK
        elif eq and (value == mount or value.startswith(mount.rstrip("/") + "/")):
            value = str(Path(repo).resolve()) + value[len(mount):]
        out.append(f"{flag}={value}" if eq else a)
    return out


def _command(spec: ContainerSpec) -> list[str]:
    """The container's command from this environment: `tritonserver` next to this Python (the launcher's console
    script), else the launcher module."""
    if spec.command and spec.command[0] == "tritonserver":
        script = Path(sys.executable).parent / "tritonserver"
        head = [str(script)] if script.exists() else [sys.executable, "-m", "biva_serving.launcher"]
        return [*head, *spec.command[1:]]
    return list(spec.command)


# ---- processes --------------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) of `pid` from /proc, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[19])


def process_table() -> dict[int, tuple[str, int, int, int, str]]:
    """Every live process: pid -> (state, ppid, pgrp, starttime, comm); zombies (state Z) left out: they have
    exited and only wait to be reaped."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st and st[0] not in ("Z", "X"):
                try:
                    comm = Path(f"/proc/{entry}/comm").read_text().strip()
                except OSError:
                    continue
                table[int(entry)] = (*st, comm)
    return table


def family(pid: int, table: dict | None = None) -> dict[int, tuple[int, str]]:
    """`pid`'s process group and every descendant of `pid`: pid -> (starttime, comm). The starttime tells a process
    from a later one that got the same pid."""
    table = process_table() if table is None else table
    out = {p: (t[3], t[4]) for p, t in table.items() if t[2] == pid or p == pid}
    frontier = {pid}
    while frontier:
        children = {p for p, t in table.items() if t[1] in frontier and p not in out}
        out.update({p: (table[p][3], table[p][4]) for p in children})
        frontier = children
    return out


def still_alive(members: dict[int, tuple[int, str]]) -> dict[int, str]:
    """Which of `members` (from `family`) are alive and not zombies: pid -> comm."""
    table = process_table()
    return {p: comm for p, (start, comm) in members.items() if p in table and table[p][3] == start}


def _is_200(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


# ---- a replica --------------------------------------------------------------------------------------------------
@dataclass
class Replica(LoopbackUrls):
    """One replica: its fixed local ports, its current process, what happened to it."""

    index: int
    ports: dict[str, int]  # container port name -> local port (http, grpc, metrics)
    log_path: Path
    handle: ServerHandle | None = None
    starts: int = 0  # processes started so far (restarts = starts - 1)
    exits: list[int] = field(default_factory=list)  # exit codes (negative: killed by that signal)
    orphans_killed: list[dict[int, str]] = field(default_factory=list)  # per exit: what the "runtime" had to kill
    ready_event: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.handle.process.pid

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def grpc_port(self) -> int:
        return self.ports["grpc"]

    @property
    def metrics_port(self) -> int:
        return self.ports["metrics"]

    @property
    def name(self) -> str:
        return f"replica{self.index}"


def start_replica(spec: ContainerSpec, repo: Path | str, ports: dict[str, int], log_path: Path,
                  env: dict[str, str] | None = None) -> ServerHandle:
    """Start the container's command with its args mapped to this machine (no waiting); its own process group."""
    cmd = [*_command(spec), *replica_args(spec, repo, ports)]
    # the container's env, under this environment's (OMP_NUM_THREADS=1 of a shared machine wins); not HOME, which
    # the container points at its writable /tmp
    base = {k: v for k, v in spec.env.items() if k != "HOME"}
    log_file = Path(log_path).open("ab")
    log_file.write(f"\n==== start: {' '.join(cmd)}\n".encode())
    log_file.flush()
    process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**base, **(env if env is not None else os.environ)}, start_new_session=True)
    return ServerHandle(process, ports["http"], ports["grpc"], ports["metrics"], Path(log_path), log_file)


def wait_started(spec: ContainerSpec, handle: ServerHandle, timeout: float) -> None:
    """Until the startup (else readiness) probe answers 200; RuntimeError if the process exits or time runs out."""
    probe = spec.startup or spec.readiness
    url = f"http://{LOOPBACK}:{handle.http_port if probe.port == 'http' else handle.metrics_port}{probe.path}"
    deadline = time.monotonic() + timeout
    while not _is_200(url, probe.timeout_s):
        if handle.process.poll() is not None:
            raise RuntimeError(f"replica exited with {handle.process.returncode} before it was ready; "
                               f"log {handle.log_path}:\n{handle.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica not ready after {timeout:.0f} s; log {handle.log_path}:\n{handle.log_tail()}")
        time.sleep(0.1)


# ---- HAProxy ----------------------------------------------------------------------------------------------------
def haproxy_config(spec: ContainerSpec, replicas: Sequence[Replica], http_port: int, grpc_port: int,
                   stats_socket: Path, stats_port: int | None = None) -> str:
    """haproxy.cfg for `replicas` from the Deployment's facts (readiness path and port, drain deadline)."""
    ready = spec.readiness
    # the longest a request may take at a replica: the client's default timeout (biva-client 120 s) bounds it
    server_timeout = 120
    lines = [
        "# generated by deploy/local.py from deploy/k8s/base/deployment.yaml: do not edit",
        "global",
        f"    maxconn {MAXCONN}",
        f"    tune.bufsize {BUFSIZE}",
        f"    stats socket {stats_socket} mode 600 level admin",
        "    hard-stop-after 30s",  # a soft stop (SIGUSR1) waits at most this long for requests in flight
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    timeout connect 1s",  # loopback: a replica that cannot accept in 1 s is down; the retry goes elsewhere
        f"    timeout client {server_timeout}s",
        f"    timeout server {server_timeout}s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 10s",
        "    timeout queue 10s",
        "    timeout check 1s",  # the readiness probe's timeoutSeconds
        "    # Retries. Every request of the BIVA API is reproducible: noise is drawn from the request's seed (a",
        "    # request without one is given one by the front model... after it reached a replica, so a retry of a",
        "    # seedless request may draw another seed; biva-client always sends one). Replaying a POST therefore has",
        "    # no consequence, which is what HAProxy 2.6's retry-on asks of the application; 2.6 applies retry-on to",
        "    # any method, POST included (no idempotence check, no extra http-request rule needed).",
        "    # conn-failure: the replica is gone (killed, restarting); empty-response: it died with the request;",
        "    # response-timeout: it hung; 502/503: its front refused (not ready, reloading a model, draining).",
        "    # 429 (busy) is not retryable in 2.6 and is the client's to wait out (Retry-After). gRPC answers",
        "    # errors as HTTP 200 with grpc-status in trailers: only the connection-level keywords act on gRPC.",
        "    retries 3",
        "    retry-on conn-failure empty-response response-timeout 502 503",
        "    option redispatch 1",  # every retry goes to another server (the balancer avoids the one that failed)
        "    # A retry needs the whole request in one buffer: wait for the body before connecting (tune.bufsize",
        f"    # {BUFSIZE // 1024} KiB; larger bodies are forwarded as they stream and never retried by HAProxy).",
        "    option http-buffer-request",
        "    # Active checks on the readiness probe's path, every 1 s. fall 1: one failed check takes a replica out",
        "    # (the readinessProbe's failureThreshold is 1 too), so a draining or dead replica leaves the route",
        "    # within about a second and retries cover that second; rise 2: back after two good checks in a row",
        "    # (2 s), so a replica that flaps while it loads does not take traffic between its first ready",
        "    # answer and a model still loading.",
        "    default-server inter 1s fastinter 500ms downinter 1s fall 1 rise 2",
        "",
        "frontend biva_http",
        f"    bind {LOOPBACK}:{http_port}",
        "    default_backend biva_http",
        "",
        "frontend biva_grpc",
        f"    bind {LOOPBACK}:{grpc_port} proto h2",  # gRPC is HTTP/2 without TLS (h2c) on this port
        "    default_backend biva_grpc",
        "",
        "backend biva_http",
        "    balance leastconn",  # per request (mode http): heavy scoring requests do not pile on one replica
        f"    option httpchk GET {ready.path}",
        "    http-check expect status 200",
    ]
    for r in replicas:
        lines.append(f"    server {r.name} {LOOPBACK}:{r.ports['http']} check")
    lines += [
        "",
        "backend biva_grpc",
        "    balance leastconn",
        f"    option httpchk GET {ready.path}",  # the same readiness path, on each replica's HTTP port
        "    http-check expect status 200",
    ]
    for r in replicas:
        # the check speaks HTTP/1.1 to the HTTP port (check-proto h1), not the h2 of the traffic
        lines.append(f"    server {r.name} {LOOPBACK}:{r.ports['grpc']} proto h2 "
                     f"check port {r.ports[ready.port]} check-proto h1")
    if stats_port:
        lines += ["", "listen stats", f"    bind {LOOPBACK}:{stats_port}", "    stats enable",
                  "    stats uri /stats", "    stats refresh 2s"]
    return "\n".join(lines) + "\n"


def haproxy_command(stats_socket: Path, command: str, timeout: float = 2.0) -> str:
    """One command on HAProxy's runtime API (the stats socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(stats_socket))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def server_states(stats_socket: Path) -> dict[tuple[str, str], str]:
    """(backend, server) -> status ("UP", "DOWN", "MAINT", "UP 1/2", ...) from `show stat`."""
    out = {}
    text = haproxy_command(stats_socket, "show stat")
    header = None
    for line in text.splitlines():
        if line.startswith("# "):
            header = line[2:].split(",")
            continue
        if not line or header is None:
            continue
        row = dict(zip(header, line.split(",")))
        if row.get("svname") not in ("FRONTEND", "BACKEND"):
            out[(row["pxname"], row["svname"])] = row.get("status", "")
    return out


# ---- the deployment ---------------------------------------------------------------------------------------------
class LocalDeployment(LoopbackUrls):
    """N replicas of the Deployment's container behind HAProxy on loopback. A context manager:

        with LocalDeployment("triton_models", replicas=2) as d:
            d.http_url, d.grpc_url          # the balancer
            d.replicas[0].http_url          # one replica directly
            d.kill(0, signal.SIGKILL)       # as the OOM killer would; the deployment restarts it
            d.rolling_restart()
    """

    BACKENDS = ("biva_http", "biva_grpc")

    def __init__(self, repo: Path | str, replicas: int = 2, http_port: int = 0, grpc_port: int = 0,
                 stats_port: int | None = 0, deployment: Path | str = DEPLOYMENT_YAML,
                 work_dir: Path | str | None = None, env: dict[str, str] | None = None,
                 log: Callable[[str], None] | None = None, haproxy: str = "haproxy"):
        self.spec = load_container(deployment)
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise FileNotFoundError(f"--repo {repo}: no such folder")
        self._own_work = work_dir is None
        self.work = Path(work_dir or tempfile.mkdtemp(prefix="biva-replicas-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.haproxy_bin = shutil.which(haproxy) or haproxy
        n_public = (http_port == 0) + (grpc_port == 0) + (stats_port == 0)
        spare = iter(free_ports(n_public + 3 * replicas))
        self.http_port = http_port or next(spare)
        self.grpc_port = grpc_port or next(spare)
        self.stats_port = (stats_port or next(spare)) if stats_port is not None else None
        names = list(self.spec.ports)  # http, grpc, metrics: the container's port names
        self.replicas = [Replica(i, {name: next(spare) for name in names}, self.work / f"replica{i}.log")
                         for i in range(replicas)]
        self.stats_socket = self.work / "haproxy.sock"
        self.cfg_path = self.work / "haproxy.cfg"
        self.haproxy: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._terminating: set[int] = set()  # replicas being terminated on purpose (rolling restart)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # ---- life -------------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float | None = None) -> None:
        """Start every replica (in parallel, as a Deployment's pods are), then HAProxy; return once HAProxy has
        every replica UP in both backends."""
        budget = timeout or self.spec.start_budget_s()
        t0 = time.monotonic()
        for r in self.replicas:
            r.handle = start_replica(self.spec, self.repo, r.ports, r.log_path, self.env)
            r.starts = 1
        for r in self.replicas:
            wait_started(self.spec, r.handle, budget - (time.monotonic() - t0))
            r.ready_event.set()
        self.log(f"biva-replicas: {len(self.replicas)} replicas ready in {time.monotonic() - t0:.1f} s")
        self.cfg_path.write_text(haproxy_config(self.spec, self.replicas, self.http_port, self.grpc_port,
                                                self.stats_socket, self.stats_port))
        check = subprocess.run([self.haproxy_bin, "-c", "-q", "-f", str(self.cfg_path)], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects {self.cfg_path}: {check.stdout}{check.stderr}")
        self._haproxy_log = (self.work / "haproxy.log").open("ab")
        self.haproxy = subprocess.Popen([self.haproxy_bin, "-f", str(self.cfg_path), "-db"], stdout=self._haproxy_log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        for r in self.replicas:
            t = threading.Thread(target=self._watch, args=(r,), name=f"biva-{r.name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.wait_routed(range(len(self.replicas)), timeout=30)
        self.log(f"biva-replicas: HAProxy on HTTP {self.http_url}, gRPC {self.grpc_url}"
                 + (f", stats http://{LOOPBACK}:{self.stats_port}/stats" if self.stats_port else "")
                 + f" ({time.monotonic() - t0:.1f} s); config {self.cfg_path}")

    def stop(self) -> None:
        """HAProxy first (soft stop: no new connections, requests in flight finish), then every replica as the
        kubelet terminates a pod (SIGTERM, SIGKILL to its group after the grace period)."""
        self._stopping.set()
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.send_signal(signal.SIGUSR1)
            try:
                self.haproxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
        threads = [threading.Thread(target=self._terminate, args=(r, False)) for r in self.replicas if r.handle]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for t in self._threads:
            t.join(timeout=5)
        if getattr(self, "_haproxy_log", None):
            self._haproxy_log.close()
        if self._own_work and os.environ.get("BIVA_KEEP_WORK") is None:
            shutil.rmtree(self.work, ignore_errors=True)

    # ---- HAProxy's view ---------------------------------------------------------------------------------------
    def states(self) -> dict[tuple[str, str], str]:
        return server_states(self.stats_socket)

    def set_route(self, i: int, state: str) -> None:
        """HAProxy server state of replica i in both backends: "ready", "drain" or "maint"."""
        for b in self.BACKENDS:
            haproxy_command(self.stats_socket, f"set server {b}/{self.replicas[i].name} state {state}")

    def wait_routed(self, indices, timeout: float = 30) -> None:
        """Until HAProxy has each replica in `indices` UP in both backends."""
        want = {(b, self.replicas[i].name) for i in indices for b in self.BACKENDS}
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = self.states()
                if all(states.get(k) == "UP" for k in want):
                    return
            except OSError:
                states = {}
            if self.haproxy is not None and self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.haproxy.returncode}; see {self.work / 'haproxy.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"HAProxy does not route to {sorted(want)} after {timeout:.0f} s: {states}")
            time.sleep(0.1)

    # ---- the kubelet's part -----------------------------------------------------------------------------------
    def _watch(self, r: Replica) -> None:
        """restartPolicy Always for replica r: wait for its process to exit, clear its group, start it again on
        the same ports, with back-off while starts fail."""
        backoff = 0.0
        while not self._stopping.is_set():
            proc = r.handle.process
            if proc.poll() is None:
                time.sleep(0.05)
                continue
            r.ready_event.clear()
            with self._lock:
                r.exits.append(proc.returncode)
            self.log(f"biva-replicas: {r.name} (pid {proc.pid}) exited with {proc.returncode}; restarting")
            # clear the dead launcher's group beside the restart (no port of the new one depends on it: Triton's
            # are private and free; one left holding the metrics port makes the start fail and back off)
            members = {p: v for p, v in family(proc.pid).items() if p != proc.pid}
            threading.Thread(target=lambda pid=proc.pid, m=members: r.orphans_killed.append(self._clear_group(pid, m)),
                             daemon=True).start()
            r.handle.stop(timeout=0)  # closes the log file; the process is reaped already
            while not self._stopping.is_set():
                if backoff:
                    self._stopping.wait(backoff)
                    if self._stopping.is_set():
                        return
                try:
                    r.handle = start_replica(self.spec, self.repo, r.ports, r.log_path, self.env)
                    with self._lock:
                        r.starts += 1
                    wait_started(self.spec, r.handle, self.spec.start_budget_s())
                    r.ready_event.set()
                    self.log(f"biva-replicas: {r.name} started again (pid {r.handle.process.pid})")
                    backoff = 0.0
                    break
                except RuntimeError as e:
                    if self._stopping.is_set():
                        return
                    self.log(f"biva-replicas: {r.name} failed to start: {str(e).splitlines()[0]}")
                    self._kill_group(r.handle)
                    backoff = min(max(1.0, 2 * backoff), RESTART_BACKOFF_MAX_S)

    def _clear_group(self, pid: int, members: dict[int, tuple[int, str]]) -> dict[int, str]:
        """What the container runtime does when a container's main process dies: anything of its group (`members`,
        taken when it died) still alive after ORPHAN_GRACE_S is SIGKILLed. Returns what had to be killed."""
        deadline = time.monotonic() + ORPHAN_GRACE_S
        alive = still_alive(members)
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = still_alive(members)
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if alive:
            self.log(f"biva-replicas: killed what the dead launcher {pid} left behind: {alive}")
        return alive

    @staticmethod
    def _kill_group(handle: ServerHandle) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.process.pid, signal.SIGKILL)
        handle.process.wait()
        handle.stop(timeout=0)

    def _terminate(self, r: Replica, prestop: bool = True) -> int:
        """The kubelet's pod termination: (the route has dropped it), preStop, SIGTERM, and SIGKILL to the whole
        group if the replica is still there after terminationGracePeriodSeconds. Returns its exit code."""
        proc = r.handle.process
        t0 = time.monotonic()
        if prestop and self.spec.prestop_s:
            time.sleep(self.spec.prestop_s)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=max(0.0, self.spec.grace_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            self.log(f"biva-replicas: {r.name} still running after the grace period; SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the pid is ours until reaped, so the group id is not reused
        proc.wait()
        r.handle.stop(timeout=0)
        return proc.returncode

    # ---- what tests and operators do to replicas ----------------------------------------------------------------
    def kill(self, i: int, sig: int = signal.SIGKILL, group: bool = False) -> int:
        """Send `sig` to replica i's launcher (group=False) or to its whole process group; returns the pid. The
        deployment restarts the replica once it exits."""
        pid = self.replicas[i].pid
        (os.killpg if group else os.kill)(pid, sig)
        return pid

    def wait_restarted(self, i: int, starts_before: int, timeout: float = 120) -> None:
        """Until replica i has been started again since `starts_before` starts, is ready and HAProxy routes to it."""
        r, deadline = self.replicas[i], time.monotonic() + timeout
        while not (r.starts > starts_before and r.ready_event.is_set()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{r.name} not restarted after {timeout:.0f} s; log {r.log_path}")
            time.sleep(0.05)
        self.wait_routed([i], timeout=max(1.0, deadline - time.monotonic()))

    def restart(self, i: int, prestop: bool = True) -> float:
        """Terminate replica i as a rollout does (out of the route, preStop, SIGTERM) and wait until the restarted
        replica is routed again; returns the seconds it took."""
        t0, r = time.monotonic(), self.replicas[i]
        before = r.starts
        self.set_route(i, "maint")  # the endpoint leaves the Service: requests in flight go on, no new ones
        try:
            if prestop and self.spec.prestop_s:
                time.sleep(self.spec.prestop_s)
            with contextlib.suppress(ProcessLookupError):
                r.handle.process.send_signal(signal.SIGTERM)
            # the watcher sees the exit and starts it again; past the grace period the group is killed
            deadline = t0 + self.spec.grace_s + (self.spec.prestop_s if prestop else 0)
            proc = r.handle.process
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                self.log(f"biva-replicas: {r.name} still running after the grace period; SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + self.spec.start_budget_s()
            while not (r.starts > before and r.ready_event.is_set()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{r.name} not started again; log {r.log_path}")
                time.sleep(0.05)
        finally:
            self.set_route(i, "ready")
        self.wait_routed([i], timeout=30)
        return time.monotonic() - t0

    def rolling_restart(self, prestop: bool = True) -> list[float]:
        """Every replica in turn, the next only once the last is routed again (maxUnavailable 0, maxSurge 1 in
        the Deployment; here the surge is the restarted replica's own slot: one replica out at a time, and
        never one before the previous is back)."""
        return [self.restart(i, prestop) for i in range(len(self.replicas))]


# ---- the command ------------------------------------------------------------------------------------------------
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("triton_models"),
              show_default=True, help="The model repository every replica serves (the Deployment's /models).")
@click.option("--replicas", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="HAProxy's HTTP port on 127.0.0.1 (0: a free one).")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True,
              help="HAProxy's gRPC port on 127.0.0.1 (0: a free one).")
@click.option("--stats-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="HAProxy's stats page on 127.0.0.1 (0: a free one).")
@click.option("--deployment", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DEPLOYMENT_YAML,
              show_default=True, help="The Kubernetes Deployment whose tritonserver container is replicated.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where haproxy.cfg, the socket and the logs go (default: a temporary folder, removed at exit).")
def main(repo: Path, replicas: int, http_port: int, grpc_port: int, stats_port: int, deployment: Path,
         work_dir: Path | None) -> None:
    """Serve REPO with N replicas of `tritonserver` behind HAProxy, restarting any replica that exits, until
    Ctrl-C or SIGTERM."""
    if shutil.which("haproxy") is None:
        raise click.ClickException("haproxy not found on PATH (Debian: apt-get install haproxy)")

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    d = LocalDeployment(repo, replicas, http_port, grpc_port, stats_port, deployment, work_dir)
    try:
        d.start()
        click.echo(f"serving {repo} with {replicas} replicas: HTTP {d.http_url}, gRPC {d.grpc_url}; "
                   f"replicas {', '.join(f'{r.http_url}/{r.grpc_url}' for r in d.replicas)}; Ctrl-C stops",
                   err=True)
        while d.haproxy.poll() is None:
            time.sleep(0.5)
        raise click.ClickException(f"haproxy exited with {d.haproxy.returncode}; see {d.work / 'haproxy.log'}")
    except KeyboardInterrupt:
        click.echo("biva-replicas: stopping HAProxy and the replicas", err=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        d.stop()


if __name__ == "__main__":
    main()
