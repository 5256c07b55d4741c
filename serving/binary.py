"""Which `tritonserver` binary runs, and what the bundled one needs to run here.

Where a real Triton build is on PATH (NVIDIA's container has /opt/tritonserver/bin/tritonserver), it is used with
the arguments unchanged. Elsewhere the binary bundled in the `nvidia-pytriton` wheel runs, which needs three things
the wheel does not set up by itself:

- a backend directory holding the python backend together with the `triton_python_backend_stub` built for the
  running Python (prepared once, cached under ~/.cache/biva-serving/);
- LD_LIBRARY_PATH to the wheel's `nvidia_pytriton.libs` (the copied stub and backend find libcudart/libarchive
  through an $ORIGIN-relative RPATH that no longer points there) and to the running Python's libpython;
- this interpreter's bin directory first on PATH. The stub embeds Python in *isolated* mode, so PYTHONPATH,
  PYTHONHOME and PYTHONUSERBASE are ignored; the embedded interpreter finds its prefix by looking up `python3` on
  PATH, and `.venv/bin/python3` next to `.venv/pyvenv.cfg` makes it adopt the virtualenv: its site-packages, .pth
  files and editable installs.

The bundled path also binds every endpoint to 127.0.0.1 unless the user gives an address, and keeps the model
control mode at Triton's default ("none": no remote load/unload). User flags always come last, so they win. No
python-backend shared-memory size is set: the default 1 MiB region grows on demand (256 MiB tensors round-trip at
the same speed as with a 64 MiB start), while a larger start is committed in /dev/shm for every instance.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Sequence

from .net import LOOPBACK, has_flag

ADDRESS_FLAGS = ("--http-address", "--grpc-address", "--metrics-address")
_OUR_MARKER = b"biva_serving.launcher"
_ELF_MAGIC = b"\x7fELF"


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


def resolve(args: list[str]) -> tuple[Path, list[str], dict[str, str]]:
    """(binary, its arguments, its environment): a real tritonserver on PATH with the arguments unchanged, or
    the bundled one with a backend directory, its cache folder and the environment its stubs need."""
    system = find_system_tritonserver()
    if system is not None:
        return system, args, dict(os.environ)
    dist = pytriton_dist()
    backend_directory = None if has_flag(args, "--backend-directory") else prepare_backend_directory(dist)
    full = build_argv(args, backend_directory=backend_directory, cache_directory=dist / "caches")
    return dist / "bin" / "tritonserver", full, bundled_env(dist)


