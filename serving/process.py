"""The Python API to a running server: start the project's `tritonserver` on free loopback ports, wait until it is
ready, stop it and everything it started (tests, the demo, the bench)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

from .binary import ADDRESS_FLAGS
from .net import LOOPBACK, LoopbackUrls, free_ports

_ERROR_LINE = re.compile(r"E\d{4} ")


def _is_ready(url: str) -> bool:
    base = url if "://" in url else f"http://{url}"
    try:
        with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, n: int = 20) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except OSError:
        return ""


def _failure_report(path: Path) -> str:
    """Triton's error lines (E + date: a model's traceback is often above the last 20 lines), then the tail."""
    try:
        lines = path.read_text(errors="replace").splitlines(keepends=True)
    except OSError:
        lines = []
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    report = f"log {path}:\n"
    if errors:
        report += "errors:\n" + "".join(errors[-10:]) + "last lines:\n"
    return report + _tail(path)


@dataclass
class ServerHandle(LoopbackUrls):
    """A running server started by `start_server`; use as a context manager or call `stop()`."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    def log_tail(self, n: int = 20) -> str:
        return _tail(self.log_path, n)

    def stop(self, timeout: float = 45) -> int:
        """SIGINT (Triton's graceful shutdown), then SIGKILL after `timeout` s; returns the exit code.

        Close `tritonclient.http` clients first: Triton waits for open HTTP
        keep-alive connections until --exit-timeout-secs (30) and then exits 1.
        The server runs in a process group of its own; whatever of that group outlives the server (a
        python-backend stub busy when the server went down does not notice and lives on) is killed too.
        """
        pid = self.process.pid
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + timeout
            while not _exited_unreaped(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            # the server is alive or an unreaped zombie, so its pid, the group's id, cannot have been reused
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.process.returncode

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exited_unreaped(pid: int) -> bool:
    """True once the child `pid` has exited; it stays a zombie (not reaped), so its pid is not reused."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _launch(repo: Path | str, extra_args: Sequence[str], log_path: Path, env: dict | None,
            ports: Sequence[int] | None = None) -> ServerHandle:
    http, grpc, metrics = ports if ports else free_ports(3)
    cmd = [
        sys.executable, "-m", "biva_serving.launcher",
        f"--model-repository={repo if '://' in str(repo) else Path(repo).resolve()}",  # s3://: the launcher fetches
        f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
        *(f"{flag}={LOOPBACK}" for flag in ADDRESS_FLAGS),  # also for a system binary
        *extra_args,
    ]
    log_file = log_path.open("wb")
    process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True)  # a group of its own, so stop() can reap its stubs
    return ServerHandle(process, http, grpc, metrics, log_path, log_file)


def start_server(
    repo: Path | str,
    *,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    ready_timeout: float = 120,
    env: dict | None = None,
    ports: Sequence[int] | None = None,
) -> ServerHandle:
    """Start this launcher on three free loopback ports and wait until the server is ready.

    Raises RuntimeError with Triton's error lines and the last 20 log lines if
    the server exits or is not ready within `ready_timeout` s. A port taken between choosing and
    binding (a race with other processes) is retried with fresh ports.
    """
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    log_path = Path(log_path)
    for attempt in range(3):
        handle = _launch(repo, extra_args, log_path, env, ports)
        try:
            if _wait_started(handle, ready_timeout, retry_on_port_clash=attempt < 2 and not ports):
                return handle
        except BaseException:  # also Ctrl-C while waiting: leave no server behind
            handle.stop()
            raise
    raise AssertionError("unreachable")


def _wait_started(handle: ServerHandle, timeout: float, retry_on_port_clash: bool) -> bool:
    """True once ready; False if it lost a port race and should be retried; raises otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if handle.process.poll() is not None:
            handle.stop()
            report = _failure_report(handle.log_path)
            if retry_on_port_clash and "already in use" in report.lower():
                return False
            code = handle.process.returncode
            raise RuntimeError(f"tritonserver exited with code {code} before it was ready; {report}")
        if _is_ready(handle.http_url):
            return True
        if time.monotonic() > deadline:
            raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s; {_failure_report(handle.log_path)}")
        time.sleep(0.2)


