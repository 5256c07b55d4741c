"""`tritonserver` as the project runs it by default: Triton behind the HTTP front, watched by the supervisor.

    tritonserver --model-repository triton_models        # the whole service, hardened (issue 10)

The user's HTTP address and port (default 127.0.0.1:8000) are served by the front (front.py); Triton's own
HTTP endpoint moves to a free private loopback port where every API needs a secret header that only this
process knows (`--http-restricted-api`), so nothing reaches Triton's HTTP parser except through the front.
gRPC stays Triton's, with the shared-memory, model-repository, logging and trace protocols restricted the
same way (`--grpc-restricted-protocol`): health, metadata, config, statistics and inference stay open.
Models load with explicit model control (`--load-model=*`), which only the supervisor can use, so a model
whose stub died is reloaded (supervisor.py). User flags still come last and win; `--biva-direct` skips all
of this.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .front import Front, FrontConfig
from .supervisor import Supervisor, become_subreaper, list_stubs, reap_children

SECRET_HEADER = "biva-admin-key"
ALL_APIS = "health,metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"
ADMIN_APIS = "shared-memory,model-repository,trace,logging"
LOOPBACK = "127.0.0.1"


def take_flag(args: list[str], name: str, default: str) -> tuple[str, list[str]]:
    """The value of `name` (`--name=v` or `--name v`, the last one wins) and the arguments without it."""
    value, rest, i = default, [], 0
    while i < len(args):
        a = args[i]
        if a == name and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


def _free_port() -> int:
    from .launcher import free_port

    return free_port()


def triton_args(args: Sequence[str], internal_port: int, secret: str) -> tuple[list[str], bool]:
    """Triton's arguments behind the front (the public HTTP flags already taken out), and whether the
    supervisor can reload models (explicit model control)."""
    ours = [f"--http-address={LOOPBACK}", f"--http-port={internal_port}",
            f"--http-restricted-api={ALL_APIS}:{SECRET_HEADER}={secret}",
            f"--grpc-restricted-protocol={ADMIN_APIS}:{SECRET_HEADER}={secret}"]
    mode, _ = take_flag(list(args), "--model-control-mode", "")
    if not mode:
        ours += ["--model-control-mode=explicit", "--load-model=*"]
    return [*ours, *args], mode in ("", "explicit")


async def _run(proc: subprocess.Popen, sup: Supervisor, server) -> int:
    """Forward SIGINT / SIGTERM to Triton and reap every child until Triton has exited (we reap it ourselves,
    as the subreaper, so Popen is never asked)."""
    loop = asyncio.get_running_loop()
    codes: dict[int, int] = {}

    def forward(sig: int) -> None:
        sup.stop()  # stubs exit with the server: not deaths to recover from
        if proc.pid not in codes:
            os.kill(proc.pid, sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, forward, sig)
    sup.start()
    while proc.pid not in codes:
        reap_children(lambda pid, code: codes.__setitem__(pid, code))
        await asyncio.sleep(0.1)
    proc.returncode = codes[proc.pid]
    sup.stop()
    server.close()
    return proc.returncode


def _finish(sup: Supervisor) -> None:
    """After Triton exited: kill the stubs it left behind (orphans reparented to us), reap them, free /dev/shm."""
    for pid, stub in list_stubs(os.getpid()).items():
        os.kill(pid, signal.SIGKILL)
        sup.regions.add(stub.shm_region)
    reap_children()
    removed = sup.cleanup()
    if removed:
        print(f"biva supervisor: removed {len(removed)} python-backend shared-memory regions", file=sys.stderr)


def _model_bytes(args: list[str]) -> dict[str, int] | None:
    """Per-model request sizes from the repository's export report; None for a repository biva-export did not
    write (the front's body limit still applies)."""
    from biva_export.repository import read_meta

    repo, _ = take_flag(list(args), "--model-repository", "")
    try:
        return read_meta(Path(repo)).max_request_bytes() if repo else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def serve(binary: Path, args: Sequence[str], env: dict[str, str]) -> int:
    """Run Triton behind the front until it exits; returns its exit code."""
    host, rest = take_flag(list(args), "--http-address", LOOPBACK)
    port, rest = take_flag(rest, "--http-port", "8000")
    internal, secret = _free_port(), secrets.token_hex(16)
    targs, can_reload = triton_args(rest, internal, secret)
    front = Front(FrontConfig(internal, f"{SECRET_HEADER}: {secret}".encode(), model_bytes=_model_bytes(rest)),
                  lambda m: False)
    loop = asyncio.new_event_loop()
    try:
        server = loop.run_until_complete(front.serve(host, int(port)))
    except OSError as e:
        print(f"error: the HTTP front cannot listen on {host}:{port}: {e.strerror} (address already in use?)",
              file=sys.stderr)
        return 1
    become_subreaper()
    proc = subprocess.Popen([str(binary), *targs], env=env)
    sup = Supervisor(proc.pid, f"http://{LOOPBACK}:{internal}", (SECRET_HEADER, secret), reload=can_reload,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    front.not_ready = sup.not_ready
    print(f"biva front: HTTP on {host}:{port} -> Triton on {LOOPBACK}:{internal} (restricted)", file=sys.stderr,
          flush=True)
    try:
        code = loop.run_until_complete(_run(proc, sup, server))
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            reap_children()
        _finish(sup)
        loop.close()
    return code
