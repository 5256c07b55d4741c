"""`tritonserver` as the project runs it by default: Triton behind the HTTP and gRPC fronts, watched by the
supervisor.

    tritonserver --model-repository triton_models        # the whole service, hardened

The user's HTTP address and port (default 127.0.0.1:8000) are served by the HTTP front (front.py), the gRPC
address and port (default 127.0.0.1:8001) by the gRPC front (grpc_front.py); both run in this process's event
loop. Triton's own endpoints move to free private loopback ports where every API needs a secret header that
only this process knows (`--http-restricted-api`, `--grpc-restricted-protocol`), so nothing reaches Triton's
parsers except through a front. Models load with explicit model control (`--load-model=*`), which only the
supervisor can use, so a model whose stub died is reloaded (supervisor.py). User flags still come last and
win; `--allow-grpc=false` leaves gRPC off; `--biva-direct` (launcher.py) skips all of this.

Abandoned work: this process makes a cancel folder, named to the stubs in inflight.CANCEL_DIR_ENV. The fronts name
every infer request with a token and write it there when its client goes away.

Shutdown, as an orchestrator sends it:
- SIGTERM (a rolling update, a scale-down, `docker stop`): the replica drains. Both fronts answer not ready at once
  and refuse new infer requests (HTTP 503 with Retry-After and `Connection: close`; gRPC stops gracefully, GOAWAY:
  a load balancer or biva-client sends them to another replica); the requests already forwarded finish, for up to the
  drain deadline (`--exit-timeout-secs`, default DRAIN_S = 20 s: under Kubernetes' default grace period of 30 s);
  then the shutdown mark stops whatever still runs (those answer 429), and Triton exits. A second SIGTERM skips the
  rest of the wait.
- SIGINT (Ctrl-C): no drain; the shutdown mark goes into the cancel folder first, so running requests stop at
  their next scorer call, and Triton exits at once.
- SIGKILL of this process (the OOM killer): Triton gets SIGKILL from the kernel too (its parent-death signal), and
  its python-backend stubs exit when they find their parent gone, so nothing of the replica holds its ports.

What the user reads: Triton's log without the lines a CPU machine always prints (CUDA, NVML, pinned memory) and
without the private ports; the whole log goes to a file named at start.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence

from biva_core.contract import read_meta
from biva_core.inflight import CANCEL_DIR_ENV, SHUTDOWN_MARK

from .front import Front, FrontConfig
from .grpc_front import GrpcFront
from .net import LOOPBACK, free_ports, take_flag
from .supervisor import Settings, Supervisor, become_subreaper, list_stubs, reap_children
from .validate import model_bytes

SECRET_HEADER = "biva-admin-key"
DRAIN_S = 20.0  # SIGTERM: how long in-flight requests may finish (--exit-timeout-secs overrides)
CANCELLED_S = 3.0  # after the drain deadline: how long cancelled requests have to answer before the fronts close
TRITON_EXIT_S = 5  # Triton's own --exit-timeout-secs once the fronts have drained
PR_SET_PDEATHSIG = 1
MEMORY_SLACK_ENV = "BIVA_MEMORY_SLACK_MB"  # the supervisor's memory slack per stub (serving/supervisor.py)
ALL_APIS = "health,metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"
# Triton's lines that say nothing on a CPU machine, or name the private ports behind the fronts
NOISE = re.compile(r"CUDA|[Cc]uda|NVML|nvml|DCGM|pinned memory|GPU metrics|Started (HTTPService|GRPCInferenceService)"
                   r"|Collecting CPU metrics|libcuda|GPU device|cudaGetDevice"
                   r"|^\s*[|+]|^\s*$|\] ?$")  # and the start-up banner: its tables, their empty title lines


def triton_args(args: Sequence[str], http_port: int, grpc_port: int, secret: str) -> tuple[list[str], bool]:
    """Triton's arguments behind the fronts (the public HTTP and gRPC flags already taken out), and whether the
    supervisor can reload models (explicit model control)."""
    ours = [f"--http-address={LOOPBACK}", f"--http-port={http_port}",
            f"--http-restricted-api={ALL_APIS}:{SECRET_HEADER}={secret}",
            f"--grpc-address={LOOPBACK}", f"--grpc-port={grpc_port}",
            f"--grpc-restricted-protocol={ALL_APIS}:{SECRET_HEADER}={secret}"]
    mode, _ = take_flag(list(args), "--model-control-mode", "")
    if not mode:
        ours += ["--model-control-mode=explicit", "--load-model=*"]
    return [*ours, *args], mode in ("", "explicit")


async def _run(proc: subprocess.Popen, sup: Supervisor, fronts: _Fronts, cancel_dir: Path, drain_s: float) -> int:
    """Drain on SIGTERM, stop at once on SIGINT (module docstring), and reap every child until Triton has exited
    (we reap it ourselves, as the subreaper, so Popen is never asked)."""
    loop = asyncio.get_running_loop()
    codes: dict[int, int] = {}
    draining: list[asyncio.Task] = []

    def stop_triton(sig: int) -> None:
        sup.stop()  # stubs exit with the server: not deaths to recover from
        (cancel_dir / SHUTDOWN_MARK).touch()  # running requests stop at their next scorer call
        if proc.pid not in codes:
            os.kill(proc.pid, sig)

    async def drain() -> None:
        _say(f"biva front: SIGTERM: not ready; draining {fronts.in_flight()} requests (up to {drain_s:g} s)")
        if not await fronts.idle(drain_s):
            _say(f"biva front: drain deadline passed; cancelling {fronts.in_flight()} requests")
            (cancel_dir / SHUTDOWN_MARK).touch()
            await fronts.idle(CANCELLED_S)
        await fronts.close()  # the open connections too: Triton would wait for them
        stop_triton(signal.SIGTERM)

    def on_sigterm() -> None:
        if draining:  # a second SIGTERM: no more waiting
            draining[0].cancel()
            stop_triton(signal.SIGTERM)
            return
        fronts.drain(drain_s)
        draining.append(loop.create_task(drain()))

    loop.add_signal_handler(signal.SIGINT, stop_triton, signal.SIGINT)
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    sup.start()
    while proc.pid not in codes:
        reap_children(lambda pid, code: codes.__setitem__(pid, code))
        await asyncio.sleep(0.1)
    proc.returncode = codes[proc.pid]
    sup.stop()
    for task in draining:
        task.cancel()
    await fronts.close()
    return proc.returncode


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _die_with(parent: int) -> Callable[[], None]:
    """preexec_fn for Triton: the kernel sends it SIGKILL when this process dies, however it dies (prctl
    PR_SET_PDEATHSIG); if this process died before that was set, Triton never starts."""
    def set_parent_death_signal() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return set_parent_death_signal


def _finish(sup: Supervisor, cancel_dir: Path) -> None:
    """After Triton exited: kill the stubs it left behind (orphans reparented to us), reap them, free /dev/shm."""
    for pid, stub in list_stubs(os.getpid()).items():
        os.kill(pid, signal.SIGKILL)
        sup.regions.add(stub.shm_region)
    reap_children()
    removed = sup.cleanup()
    shutil.rmtree(cancel_dir, ignore_errors=True)
    if removed:
        print(f"biva supervisor: removed {len(removed)} python-backend shared-memory regions", file=sys.stderr)


def _model_bytes(args: list[str]) -> dict[str, int] | None:
    """Per-model request sizes from the repository's export report; None for a repository biva-export did not
    write (the front's body limit still applies)."""
    repo, _ = take_flag(list(args), "--model-repository", "")
    try:
        return model_bytes(read_meta(Path(repo))) if repo else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class _Fronts:
    """The fronts on the user's public addresses (gRPC None with --allow-grpc=false)."""

    http: Front
    grpc: GrpcFront | None
    http_at: tuple[str, str]  # (host, port)
    grpc_at: tuple[str, str]
    servers: list = field(default_factory=list)

    async def listen(self) -> None:
        """Both listening, or OSError naming the front that cannot (and none left listening)."""
        try:
            self.servers.append(await self.http.serve(self.http_at[0], int(self.http_at[1])))
        except OSError as e:
            raise OSError(f"the HTTP front cannot listen on {':'.join(self.http_at)}: {e.strerror or e} "
                          "(address already in use?)") from None
        if self.grpc is not None:
            try:
                self.servers.append(await self.grpc.serve(self.grpc_at[0], int(self.grpc_at[1])))
            except OSError as e:
                await self.close()
                raise OSError(f"the gRPC front cannot listen on {':'.join(self.grpc_at)}: {e}") from None

    def watch(self, not_ready: Callable[[str | None], bool]) -> None:
        """Readiness from the supervisor, for both fronts."""
        for front in (self.http, self.grpc):
            if front is not None:
                front.not_ready = not_ready

    def drain(self, grace: float) -> None:
        self.http.drain()
        if self.grpc is not None and len(self.servers) > 1:
            self.grpc.drain(self.servers[1], grace)

    def in_flight(self) -> int:
        return sum(f.in_flight.count for f in (self.http, self.grpc) if f is not None and f.in_flight is not None)

    async def idle(self, timeout: float) -> bool:
        """Wait until no forwarded request is left on either front, for up to `timeout` s; whether none is."""
        waits = [f.in_flight.idle() for f in (self.http, self.grpc) if f is not None and f.in_flight is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def describe(self) -> str:
        text = f"HTTP on {':'.join(self.http_at)}"
        if self.grpc is not None:
            text += f", gRPC on {':'.join(self.grpc_at)}"
        return text

    async def close(self) -> None:
        if self.servers:
            self.servers[0].close()
            self.http.close_connections()
        if len(self.servers) > 1:
            await self.grpc.close(self.servers[1])
        self.servers = []


def _behind_fronts(args: list[str], cancel_dir: Path) -> tuple[_Fronts, list[str], bool, float]:
    """The fronts on the user's addresses, Triton's arguments behind them (the public address flags and the drain
    deadline taken out), whether the supervisor can reload models, and the drain deadline."""
    drain_s, rest = take_flag(args, "--exit-timeout-secs", str(DRAIN_S))
    host, rest = take_flag(rest, "--http-address", LOOPBACK)
    port, rest = take_flag(rest, "--http-port", "8000")
    grpc_host, rest = take_flag(rest, "--grpc-address", LOOPBACK)
    grpc_port, rest = take_flag(rest, "--grpc-port", "8001")
    allow_grpc, _ = take_flag(rest, "--allow-grpc", "true")  # stays in Triton's arguments too
    internal, internal_grpc = free_ports(2)
    secret = secrets.token_hex(16)
    cfg = FrontConfig(internal, f"{SECRET_HEADER}: {secret}".encode(), model_bytes=_model_bytes(rest),
                      cancel_dir=str(cancel_dir))
    grpc_front = None
    if allow_grpc.lower() not in ("false", "0", "no", "off"):
        grpc_front = GrpcFront(cfg, internal_grpc, (SECRET_HEADER, secret), lambda m: False)
    targs, can_reload = triton_args([*rest, f"--exit-timeout-secs={TRITON_EXIT_S}"], internal, internal_grpc, secret)
    fronts = _Fronts(Front(cfg, lambda m: False), grpc_front, (host, port), (grpc_host, grpc_port))
    return fronts, targs, can_reload, float(drain_s)


def _relay_log(stream: IO[bytes], full: IO[bytes]) -> threading.Thread:
    """Copy Triton's output to the full log, and to our stderr all but the NOISE lines."""
    def pump() -> None:
        for line in iter(stream.readline, b""):
            full.write(line)
            full.flush()
            if not NOISE.search(line.decode(errors="replace")):
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
    t = threading.Thread(target=pump, name="biva-triton-log", daemon=True)
    t.start()
    return t


def serve(binary: Path, args: Sequence[str], env: dict[str, str]) -> int:
    """Run Triton behind the fronts until it exits; returns its exit code."""
    shm = Path("/dev/shm")
    cancel_dir = Path(tempfile.mkdtemp(prefix="biva-serving-", dir=shm if shm.is_dir() else None))
    try:
        fronts, targs, can_reload, drain_s = _behind_fronts(list(args), cancel_dir)
    except ValueError:
        print("error: --exit-timeout-secs must be a number of seconds", file=sys.stderr)
        shutil.rmtree(cancel_dir, ignore_errors=True)
        return 2
    become_subreaper()
    full_log = Path(tempfile.gettempdir()) / f"biva-tritonserver-{os.getpid()}.log"
    with full_log.open("wb") as log:
        # Triton starts while this process has one thread (preexec_fn is safe then): before the fronts' gRPC
        # threads and the log relay
        proc = subprocess.Popen([str(binary), *targs], env={**env, CANCEL_DIR_ENV: str(cancel_dir)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with(os.getpid()))
        relay = _relay_log(proc.stdout, log)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # grpc.aio looks the loop up
        try:
            loop.run_until_complete(fronts.listen())
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            _cleanup(cancel_dir)
            loop.close()
            return 1
        secret = fronts.http.cfg.secret_header.decode().split(":", 1)[1].strip()
        sup = Supervisor(proc.pid, f"http://{LOOPBACK}:{fronts.http.cfg.upstream_port}", (SECRET_HEADER, secret),
                         Settings(reload=can_reload, cancel_dir=str(cancel_dir),
                                  memory_slack_mb=float(os.environ.get(MEMORY_SLACK_ENV, Settings.memory_slack_mb))),
                         log=_say)
        fronts.watch(sup.not_ready)
        _say(f"biva front: {fronts.describe()}; Triton's whole log: {full_log}")
        try:
            code = loop.run_until_complete(_run(proc, sup, fronts, cancel_dir, drain_s))
        finally:
            if proc.returncode is None:
                os.kill(proc.pid, signal.SIGKILL)
                reap_children()
            _finish(sup, cancel_dir)
            relay.join(timeout=5)
            loop.close()
    return code


def _cleanup(cancel_dir: Path) -> None:
    shutil.rmtree(cancel_dir, ignore_errors=True)
