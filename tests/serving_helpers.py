"""Helpers shared by the tests that export a checkpoint and talk to a real tritonserver (not fixtures: plain
functions, so a test module can build its own module-scoped server from them)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from biva_core.contract import wire_type
from biva_serving.net import free_ports
from biva_serving.process import _is_ready

PROTOCOLS = {"http": thttp, "grpc": tgrpc}


def export_repo(tmp_path_factory, ckpt: Path, name: str, max_batch: int, front_instances: int) -> Path:
    """biva-export of `ckpt` into a fresh folder (python backend, one thread per graph)."""
    from biva_export.pipeline import ExportConfig, run_export
    from biva_export.serving_config import ServingConfig

    out = tmp_path_factory.mktemp(name) / "triton_models"
    serving = ServingConfig(max_batch=max_batch, threads=1, front_instances=front_instances, runtime="onnxruntime")
    run_export(ckpt, out, ExportConfig(serving=serving), log=lambda *_: None)
    return out


def serve(repo: Path, tmp_path_factory, name: str) -> Iterator:
    """A real tritonserver on free loopback ports for the duration of a fixture (yield from this)."""
    from biva_serving.process import start_server

    handle = start_server(repo, log_path=tmp_path_factory.mktemp(name) / "server.log")
    yield handle
    handle.stop()


def infer(server, protocol: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    """One request over HTTP or gRPC; FP32, INT64 or BYTES (numpy object) inputs by dtype; the outputs in the order
    asked."""
    mod = PROTOCOLS[protocol]
    client = mod.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    try:
        ins = []
        for name, a in inputs.items():
            t = mod.InferInput(name, list(a.shape), wire_type(a))
            t.set_data_from_numpy(a)
            ins.append(t)
        res = client.infer(model, ins, outputs=[mod.InferRequestedOutput(o) for o in outputs])
        return [res.as_numpy(o) for o in outputs]
    finally:
        client.close()


def i64(v) -> np.ndarray:
    return np.array(v if isinstance(v, list) else [v], np.int64)


def free_port() -> int:
    """A port free on loopback now (a test's "nothing listens here" address, or one port to hand to a tool)."""
    return free_ports(1)[0]


def wait_ready(url: str, timeout: float) -> None:
    """Poll `url` ("127.0.0.1:PORT" or "http://...") until /v2/health/ready answers 200."""
    deadline = time.monotonic() + timeout
    while not _is_ready(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Triton at {url} not ready after {timeout:.0f} s")
        time.sleep(0.2)
