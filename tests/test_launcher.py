"""The `tritonserver` launcher: argv building and binary choice (pure), then a real server on a tiny model."""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

import biva_serving.binary as binaries
import biva_serving.launcher as launcher
import biva_serving.net as net
import biva_serving.process as process
from biva_serving.binary import ADDRESS_FLAGS, build_argv, find_system_tritonserver
from biva_serving.process import start_server
from serving_helpers import wait_ready

MODEL = "double"

CONFIG = """\
backend: "python"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 100 }
input [{ name: "X", data_type: TYPE_FP32, dims: [-1] }]
output [{ name: "Y", data_type: TYPE_FP32, dims: [-1] }]
"""

# Imports onnxruntime and biva_export (an editable install, found only through
# the venv's .pth files) to prove the stub sees the project's virtualenv.
MODEL_PY = '''\
import numpy as np
import onnxruntime  # noqa: F401
import biva_export  # noqa: F401
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x * 2).astype(np.float32))]) for x in xs]
'''


def write_double_model(repo: Path) -> Path:
    (repo / MODEL / "1").mkdir(parents=True)
    (repo / MODEL / "config.pbtxt").write_text(CONFIG)
    (repo / MODEL / "1" / "model.py").write_text(MODEL_PY)
    return repo


# ---------------------------------------------------------------------------
# argv and binary choice, without starting anything


def _values(argv: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")] + [
        argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag
    ]


def test_build_argv_defaults_to_loopback_and_keeps_user_args_last() -> None:
    user = ["--model-repository", "triton_models", "--log-verbose=1", "--strict-readiness", "true"]
    argv = build_argv(user, backend_directory=Path("/b"), cache_directory=Path("/c"))
    assert argv[-len(user):] == user
    for flag in ADDRESS_FLAGS:
        assert _values(argv, flag) == ["127.0.0.1"]
    assert _values(argv, "--backend-directory") == ["/b"]
    assert _values(argv, "--cache-directory") == ["/c"]
    assert not any(a.startswith("--model-control-mode") for a in argv)


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_build_argv_respects_user_address_and_flags(form: str) -> None:
    http = ["--http-address", "0.0.0.0"] if form == "separate" else ["--http-address=0.0.0.0"]
    user = ["--model-repository=r", *http, "--model-control-mode=explicit", "--backend-directory", "/mine"]
    argv = build_argv(user, backend_directory=Path("/b"))
    assert argv[-len(user):] == user
    assert _values(argv, "--http-address") == ["0.0.0.0"]
    assert _values(argv, "--grpc-address") == ["127.0.0.1"]
    assert _values(argv, "--metrics-address") == ["127.0.0.1"]
    assert _values(argv, "--backend-directory") == ["/mine"]
    assert _values(argv, "--model-control-mode") == ["explicit"]


def _executable(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o755)
    return path


def test_find_system_tritonserver_skips_our_console_script(tmp_path: Path) -> None:
    script = b"#!/usr/bin/python3\nfrom biva_serving.launcher import main\n"
    ours = _executable(tmp_path / "venv" / "tritonserver", script)
    real = _executable(tmp_path / "opt" / "tritonserver", b"\x7fELF" + b"\0" * 60)
    assert find_system_tritonserver(str(ours.parent)) is None
    assert find_system_tritonserver(os.pathsep.join([str(ours.parent), str(real.parent)])) == real


class _Exec(Exception):
    pass


def _capture_exec(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple]:
    calls: list[tuple] = []

    def fake(*args):
        calls.append(args)
        raise _Exec

    monkeypatch.setattr(launcher.os, name, fake)
    return calls


def test_main_execs_system_binary_with_args_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--biva-direct: the real binary alone, as a plain tritonserver (no front, no supervisor)."""
    real = _executable(tmp_path / "opt" / "tritonserver", b"\x7fELF" + b"\0" * 60)
    monkeypatch.setenv("PATH", str(real.parent))
    calls = _capture_exec(monkeypatch, "execve")
    args = ["--model-repository", "triton_models", "--http-port=1"]
    with pytest.raises(_Exec):
        launcher.main([*args, net.DIRECT_FLAG])
    assert [c[:2] for c in calls] == [(real, [str(real), *args])]


def test_main_serves_behind_the_front_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import biva_serving.guard as guard

    real = _executable(tmp_path / "opt" / "tritonserver", b"\x7fELF" + b"\0" * 60)
    monkeypatch.setenv("PATH", str(real.parent))
    calls: list[tuple] = []

    def fake_serve(*a):
        calls.append(a)
        raise _Exec

    monkeypatch.setattr(guard, "serve", fake_serve)
    args = ["--model-repository", "triton_models", "--http-port=1"]
    with pytest.raises(_Exec):
        launcher.main(args)
    assert [c[:2] for c in calls] == [(real, args)]


def test_triton_args_behind_the_front_restrict_and_reload() -> None:
    from biva_serving.guard import triton_args
    from biva_serving.net import take_flag

    port, rest = take_flag(["--model-repository", "r", "--http-port", "9", "--http-port=10"], "--http-port", "8000")
    assert port == "10" and rest == ["--model-repository", "r"]
    args, reload = triton_args(rest, 4242, 4343, "s3cret")
    assert reload and "--model-control-mode=explicit" in args and args[-2:] == rest
    assert "--http-port=4242" in args and "--http-address=127.0.0.1" in args
    assert "--grpc-port=4343" in args and "--grpc-address=127.0.0.1" in args
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):  # only the fronts reach Triton
        [value] = _values(args, flag)
        apis, key = value.split(":")
        assert key == "biva-admin-key=s3cret" and {"inference", "health", "shared-memory"} <= set(apis.split(","))
    assert not triton_args(["--model-control-mode=none"], 1, 2, "s")[1]


def test_main_runs_bundled_binary_with_backend_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = _capture_exec(monkeypatch, "execve")
    with pytest.raises(_Exec):
        launcher.main(["--model-repository", "triton_models", net.DIRECT_FLAG])
    [(binary, argv, env)] = calls
    dist = binaries.pytriton_dist()
    assert binary == dist / "bin" / "tritonserver" and argv[0] == str(binary)
    assert argv[-2:] == ["--model-repository", "triton_models"]
    [backends] = _values(argv, "--backend-directory")
    stub = Path(backends) / "python" / "triton_python_backend_stub"
    assert stub.is_file() and os.access(stub, os.X_OK)
    assert (Path(backends) / "python" / "libtriton_python.so").is_file()
    assert Path(backends).is_relative_to(tmp_path / "cache")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert str(dist.parent.parent / "nvidia_pytriton.libs") in env["LD_LIBRARY_PATH"].split(os.pathsep)
    # Cached: a second preparation reuses the same directory.
    assert binaries.prepare_backend_directory(dist) == Path(backends)


# ---------------------------------------------------------------------------
# A real server


def _decode_proc_addr(hexaddr: str) -> str:
    """Address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(hexaddr[i:i + 8])[::-1] for i in range(0, len(hexaddr), 8))
    addr = ipaddress.ip_address(raw)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on `port`, from /proc/net."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            hexaddr, hexport = fields[1].split(":")
            if fields[3] == "0A" and int(hexport, 16) == port:
                found.add(_decode_proc_addr(hexaddr))
    return found


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: picks the outgoing address, sends nothing
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("launcher")
    repo = write_double_model(tmp / "repo")
    handle = start_server(repo, log_path=tmp / "tritonserver.log", ready_timeout=120)
    yield handle
    handle.stop()


@pytest.mark.server
def test_http_and_grpc_serve_the_model(server) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    for client_module, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        client = client_module.InferenceServerClient(url)
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready(MODEL)
            inp = client_module.InferInput("X", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            y = client.infer(MODEL, [inp]).as_numpy("Y")
        finally:
            client.close()  # an open HTTP keep-alive connection delays the server's exit
        assert y.shape == x.shape and np.max(np.abs(y - 2 * x)) <= 0.0


@pytest.mark.server
def test_endpoints_listen_on_loopback_only(server) -> None:
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        assert listening_addresses(port) == {"127.0.0.1"}, port
    ip = _non_loopback_ip()
    if ip is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ip, server.http_port), timeout=5).close()


@pytest.mark.server
def test_remote_model_load_is_refused(server) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    for client_module, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        client = client_module.InferenceServerClient(url)
        try:
            with pytest.raises(InferenceServerException, match="not allowed|restricted"):
                client.load_model(MODEL)
            with pytest.raises(InferenceServerException, match="not allowed|restricted"):
                client.unload_model(MODEL)
            assert client.is_model_ready(MODEL)
        finally:
            client.close()


@pytest.mark.server
def test_stop_exits_cleanly_and_releases_ports(model_repo: Path, tmp_path: Path) -> None:
    handle = start_server(write_double_model(model_repo), log_path=tmp_path / "log.txt")
    ports = (handle.http_port, handle.grpc_port, handle.metrics_port)
    assert all(listening_addresses(p) for p in ports)
    assert handle.stop() == 0, handle.log_tail()
    assert not any(listening_addresses(p) for p in ports)


@pytest.mark.server
def test_start_server_reports_a_broken_model(model_repo: Path, tmp_path: Path) -> None:
    write_double_model(model_repo)
    (model_repo / MODEL / "1" / "model.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(RuntimeError, match="no_such_module_xyz"):
        start_server(model_repo, log_path=tmp_path / "log.txt", ready_timeout=60)


@pytest.mark.server
def test_start_server_retries_when_a_port_is_taken(
    model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_free_ports = process.free_ports
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    calls = []

    def first_call_clashes(n: int) -> list[int]:
        ports = real_free_ports(n)
        calls.append(ports)
        return [taken, *ports[1:]] if len(calls) == 1 else ports

    monkeypatch.setattr(process, "free_ports", first_call_clashes)
    try:
        with start_server(write_double_model(model_repo), log_path=tmp_path / "log.txt") as handle:
            assert len(calls) == 2 and handle.http_port != taken
            wait_ready(handle.http_url, timeout=5)
    finally:
        busy.close()


@pytest.mark.server
def test_console_script_serves_from_another_directory(model_repo: Path, tmp_path: Path) -> None:
    """`tritonserver --model-repository REPO` as written, run from an unrelated cwd with a relative path."""
    import subprocess

    write_double_model(model_repo)
    script = Path(sys.executable).parent / "tritonserver"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    http, grpc, metrics = net.free_ports(3)
    log = (tmp_path / "log.txt").open("wb")
    proc = subprocess.Popen(
        [str(script), "--model-repository", model_repo.name,
         f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"],
        cwd=model_repo.parent, stdout=log, stderr=subprocess.STDOUT,
    )
    handle = process.ServerHandle(proc, http, grpc, metrics, tmp_path / "log.txt", log)
    try:
        wait_ready(handle.http_url, timeout=120)
        assert listening_addresses(http) == {"127.0.0.1"}
    finally:
        code = handle.stop()
    assert code == 0, handle.log_tail()
    # what the user reads: no CUDA noise of a CPU machine, no start-up banner tables, no private upstream ports
    said = (tmp_path / "log.txt").read_text()
    assert "loaded" in said and "biva front: HTTP on" in said, said[-2000:]
    for line in said.splitlines():
        assert not re.search(r"[Cc][Uu][Dd][Aa]|NVML|^\s*[|+]|Started (HTTPService|GRPCInferenceService)", line), line
