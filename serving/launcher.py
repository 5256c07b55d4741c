"""`tritonserver` that works on this machine, and a Python API to start it.

Where a real Triton build is on PATH (NVIDIA's container has
/opt/tritonserver/bin/tritonserver), `main()` execs it with the arguments
unchanged. Elsewhere it runs the binary bundled in the `nvidia-pytriton`
wheel, which needs three things the wheel does not set up by itself:

- a backend directory holding the python backend together with the
  `triton_python_backend_stub` built for the running Python (prepared once,
  cached under ~/.cache/biva-serving/);
- LD_LIBRARY_PATH to the wheel's `nvidia_pytriton.libs` (the copied stub and
  backend find libcudart/libarchive through an $ORIGIN-relative RPATH that no
  longer points there) and to the running Python's libpython;
- this interpreter's bin directory first on PATH. The stub embeds Python in
  *isolated* mode, so PYTHONPATH, PYTHONHOME and PYTHONUSERBASE are ignored;
  the embedded interpreter finds its prefix by looking up `python3` on PATH,
  and `.venv/bin/python3` next to `.venv/pyvenv.cfg` makes it adopt the
  virtualenv: its site-packages, .pth files and editable installs.

The bundled path also binds every endpoint to 127.0.0.1 unless the user
gives an address, and keeps the model control mode at Triton's default
("none": no remote load/unload). User flags always come last, so they win.
No python-backend shared-memory size is set: the default 1 MiB region grows
on demand (256 MiB tensors round-trip at the same speed as with a 64 MiB
start), while a larger start is committed in /dev/shm for every instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn, Sequence

LOOPBACK = "127.0.0.1"
DIRECT_FLAG = "--biva-direct"  # no front, no supervisor: Triton's own endpoints, as before issue 10
ADDRESS_FLAGS = ("--http-address", "--grpc-address", "--metrics-address")
_OUR_MARKER = b"biva_serving.launcher"
_ELF_MAGIC = b"\x7fELF"
_ERROR_LINE = re.compile(r"E\d{4} ")


# ---------------------------------------------------------------------------
# argv


def has_flag(args: Sequence[str], name: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in args)


def build_argv(
    user_args: Sequence[str],
    *,
    backend_directory: Path | None = None,
    cache_directory: Path | None = None,
) -> list[str]:
    """Arguments for the bundled binary: our defaults first, then `user_args` unchanged.

    A default is added only when the user did not give that flag; since
    Triton keeps the last value of a repeated flag, the user's value wins even
    where the check misses a spelling (getopt also accepts `--http-addr`).
    """
    defaults: list[str] = []
    for flag in ADDRESS_FLAGS:
        if not has_flag(user_args, flag):
            defaults.append(f"{flag}={LOOPBACK}")
    if backend_directory is not None and not has_flag(user_args, "--backend-directory"):
        defaults.append(f"--backend-directory={backend_directory}")
    if cache_directory is not None and not has_flag(user_args, "--cache-directory"):
        defaults.append(f"--cache-directory={cache_directory}")
    return [*defaults, *user_args]


# ---------------------------------------------------------------------------
# Finding a binary


def _is_our_script(path: Path) -> bool:
    try:
        if Path(sys.argv[0]).exists() and path.samefile(sys.argv[0]):
            return True
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return True  # unreadable: not something we can exec either
    return not head.startswith(_ELF_MAGIC) and _OUR_MARKER in head


def find_system_tritonserver(path_env: str | None = None) -> Path | None:
    """First `tritonserver` on PATH that is not this launcher's console script (any copy of it)."""
    path_env = os.environ.get("PATH", "") if path_env is None else path_env
    for directory in path_env.split(os.pathsep):
        candidate = Path(directory or ".") / "tritonserver"
        if candidate.is_file() and os.access(candidate, os.X_OK) and not _is_our_script(candidate):
            return candidate
    return None


def pytriton_dist() -> Path:
    """`site-packages/pytriton/tritonserver`, found without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no tritonserver on PATH and nvidia-pytriton is not installed")
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise RuntimeError(f"nvidia-pytriton has no bundled tritonserver at {dist}")
    return dist


def _stub_path(dist: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {version}")
    return stub


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "biva-serving"


def _backend_key(dist: Path, stub: Path) -> str:
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    parts = [str(dist.resolve()), version, str(stub)]
    for path in (stub, dist / "backends" / "python" / "libtriton_python.so"):
        st = path.stat()
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def prepare_backend_directory(dist: Path | None = None, cache_root: Path | None = None) -> Path:
    """A backend directory with the python backend and this Python's stub; built once, atomically.

    Concurrent launchers each build in a private temporary directory and
    rename it into place; the loser of the race discards its copy.
    """
    dist = pytriton_dist() if dist is None else dist
    stub = _stub_path(dist)
    if cache_root is not None:
        roots = [cache_root]
    else:  # a read-only home falls back to the temporary directory
        roots = [_cache_root(), Path(tempfile.gettempdir()) / f"biva-serving-{os.getuid()}"]
    key = _backend_key(dist, stub)
    error: OSError | None = None
    for root in roots:
        final = root / f"backends-{key}"
        if (final / "python" / "triton_python_backend_stub").is_file():
            return final
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".backends-", dir=root))
            try:
                shutil.copytree(
                    dist / "backends" / "python",
                    tmp / "python",
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
                shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not (final / "python" / "triton_python_backend_stub").is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return final
        except OSError as exc:
            error = exc
    raise RuntimeError(f"cannot prepare the python backend directory: {error}")


def _prepend(value: str | None, *entries: str) -> str:
    parts = [e for e in entries if e]
    parts += [p for p in (value or "").split(os.pathsep) if p and p not in parts]
    return os.pathsep.join(parts)


def bundled_env(dist: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment in which the bundled binary's python-backend stubs see this virtualenv."""
    env = dict(os.environ if base is None else base)
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    libpython_dir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if not (soname and (Path(libpython_dir) / soname).is_file()):
        libpython_dir = ""  # static Python: the stub falls back to the system libpython
    env["LD_LIBRARY_PATH"] = _prepend(env.get("LD_LIBRARY_PATH"), str(libs), libpython_dir)
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "python3").exists():
        env["PATH"] = _prepend(env.get("PATH"), str(bin_dir))
    return env


def _resolve(args: list[str]) -> tuple[Path, list[str], dict[str, str]]:
    """(binary, its arguments, its environment): a real tritonserver on PATH with the arguments unchanged, or
    the bundled one with a backend directory, its cache folder and the environment its stubs need."""
    system = find_system_tritonserver()
    if system is not None:
        return system, args, dict(os.environ)
    dist = pytriton_dist()
    backend_directory = None if has_flag(args, "--backend-directory") else prepare_backend_directory(dist)
    full = build_argv(args, backend_directory=backend_directory, cache_directory=dist / "caches")
    return dist / "bin" / "tritonserver", full, bundled_env(dist)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """`tritonserver ARGS`: Triton behind the HTTP and gRPC fronts and the supervisor (serving/front.py,
    serving/grpc_front.py, serving/supervisor.py); `--biva-direct` runs Triton alone with ARGS, as a plain
    tritonserver would."""
    args = list(sys.argv[1:] if argv is None else argv)
    direct = DIRECT_FLAG in args
    args = [a for a in args if a != DIRECT_FLAG]
    try:
        binary, full, env = _resolve(args)
    except RuntimeError as exc:
        print(f"tritonserver: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if direct:
        os.execve(binary, [str(binary), *full], env)
    from .guard import serve

    raise SystemExit(serve(binary, full, env))


# ---------------------------------------------------------------------------
# Python API: start a server on free loopback ports


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on loopback (all held open until chosen, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def _is_ready(url: str) -> bool:
    base = url if "://" in url else f"http://{url}"
    try:
        with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(url: str, timeout: float) -> None:
    """Poll `url` ("127.0.0.1:PORT" or "http://...") until /v2/health/ready answers 200."""
    deadline = time.monotonic() + timeout
    while not _is_ready(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Triton at {url} not ready after {timeout:.0f} s")
        time.sleep(0.2)


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
class ServerHandle:
    """A running server started by `start_server`; use as a context manager or call `stop()`."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{LOOPBACK}:{self.metrics_port}"

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


def _launch(repo: Path, extra_args: Sequence[str], log_path: Path, env: dict | None,
            ports: Sequence[int] | None = None) -> ServerHandle:
    http, grpc, metrics = ports if ports else free_ports(3)
    cmd = [
        sys.executable, "-m", "biva_serving.launcher",
        f"--model-repository={Path(repo).resolve()}",
        f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
        *(f"{flag}={LOOPBACK}" for flag in ADDRESS_FLAGS),  # also for a system binary
        *extra_args,
    ]
    log_file = log_path.open("wb")
    process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True)  # a group of its own, so stop() can reap its stubs
    return ServerHandle(process, http, grpc, metrics, log_path, log_file)


def start_server(
    repo: Path,
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


if __name__ == "__main__":
    main()
