"""Issue 10: what an attacker on the port can send, replayed against the default deployment (the project's
`tritonserver`: front + supervisor) serving the tiny model. After every attack a good request must succeed.

Every socket has a timeout and every test a pytest timeout, so a regression cannot hang CI."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from biva_serving.front import FrontConfig
from biva_serving.validate import Refused, check_tensor, json_depth
from serving_helpers import i64, infer

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]


def _raw(server, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _good(server) -> None:
    """A good request over HTTP and gRPC: the server is up and the models serve."""
    for mod, url in ((thttp, server.http_url), (tgrpc, server.grpc_url)):
        client = mod.InferenceServerClient(url)
        try:
            n = mod.InferInput("n", [1], "INT64")
            n.set_data_from_numpy(np.array([2], np.int64))
            images = client.infer("biva_sample", [n]).as_numpy("images")
            assert images.shape == (2, 1, 28, 28) and np.isfinite(images).all()
        finally:
            client.close()


def _infer_json(inputs: list[dict]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def test_json_depth_is_counted_outside_strings() -> None:
    assert json_depth(b'{"a": [[1], [2]]}') == 3
    assert json_depth(b'{"a": "[[[[[[[["}') == 1
    assert json_depth(b"[" * 40000 + b"]" * 40000) == 40000


def test_deeply_nested_json_is_refused_and_the_server_keeps_serving(tiny_server) -> None:
    deep = b'{"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": ' + b"[" * 40000 + b"1" \
        + b"]" * 40000 + b"}]}"
    status, body = _raw(tiny_server, "POST", "/v2/models/biva_sample/infer", deep)
    assert status == 400 and b"nests 40003 levels" in body
    _good(tiny_server)


@pytest.mark.parametrize("shape,params", [
    ([2**62, 1, 28, 28], {}),  # element count overflows 64 bits, no data
    ([2**62, 1, 28, 28], {"binary_data_size": 0}),
    ([2**40, 1, 28, 28], {"binary_data_size": 3136}),  # a lie: far more than the bytes sent
    ([3, 1, 28, 28], {"binary_data_size": 3136}),  # one image of data for three declared
])
def test_declared_shapes_that_lie_are_refused_over_http(tiny_server, shape, params) -> None:
    inp = {"name": "images", "shape": shape, "datatype": "FP32"}
    if params:
        inp["parameters"] = params
    head = _infer_json([inp])
    body = head + (b"\0" * params["binary_data_size"] if params.get("binary_data_size") else b"")
    headers = {"Inference-Header-Content-Length": str(len(head))} if params else {}
    for model in ("biva_score", "biva_encode", "biva_graph_encoder"):
        status, answer = _raw(tiny_server, "POST", f"/v2/models/{model}/infer", body, headers)
        assert status == 400 and b"images" in answer, (model, status, answer)
    _good(tiny_server)


def test_json_data_longer_than_the_shape_is_refused(tiny_server) -> None:
    body = _infer_json([{"name": "n", "shape": [1], "datatype": "INT64", "data": [5, 6]}])
    status, answer = _raw(tiny_server, "POST", "/v2/models/biva_sample/infer", body)
    assert status == 400 and b"data holds 2 values" in answer
    _good(tiny_server)


def test_bodies_over_the_limit_and_slow_heads_are_refused(tiny_server) -> None:
    with socket.create_connection(("127.0.0.1", tiny_server.http_port), timeout=30) as s:
        s.sendall(b"POST /v2/models/biva_score/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n")
        assert s.recv(200).startswith(b"HTTP/1.1 413")
    with socket.create_connection(("127.0.0.1", tiny_server.http_port), timeout=30) as s:
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n")
        assert s.recv(200).startswith(b"HTTP/1.1 431")
    _good(tiny_server)


@pytest.mark.parametrize("method,path", [
    ("POST", "/v2/systemsharedmemory/region/stolen/register"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/biva_score/unload"),
    ("POST", "/v2/logging"),
    ("POST", "/v2/trace/setting"),
    ("GET", "/v2/models/biva_score/trace/setting"),
])
def test_admin_apis_are_refused_over_http(tiny_server, method, path) -> None:
    status, body = _raw(tiny_server, method, path, b'{"log_verbose_level": 1}' if method == "POST" else b"")
    assert status == 403 and b"not allowed" in body
    _good(tiny_server)


def test_admin_apis_are_refused_over_grpc(tiny_server) -> None:
    client = tgrpc.InferenceServerClient(tiny_server.grpc_url)
    try:
        for call in (lambda: client.register_system_shared_memory("stolen", "/triton_python_backend_shm", 1024),
                     lambda: client.get_system_shared_memory_status(), lambda: client.unload_model("biva_score"),
                     lambda: client.get_model_repository_index(),
                     lambda: client.update_log_settings({"log_verbose_level": 1}),
                     lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})):
            with pytest.raises(InferenceServerException, match="not allowed on this port") as e:
                call()
            assert e.value.status() == "StatusCode.PERMISSION_DENIED"
        assert client.is_model_ready("biva_score")
    finally:
        client.close()
    _good(tiny_server)


# ---- gRPC: the front checks what Triton would pass to a stub -------------------------------------

BODY_LIMIT = FrontConfig.__dataclass_fields__["max_body_bytes"].default  # the HTTP front's body limit
SEED = ("seed", "INT64", [1], i64(1).tobytes())
OVERFLOW = {  # model -> a request whose first input declares 2^62 rows and carries no bytes
    "biva_score": [("images", "FP32", [2**62, 1, 28, 28], b""), SEED],
    "biva_encode": [("images", "FP32", [2**62, 1, 28, 28], b""), SEED],
    "biva_regenerate": [("z", "FP32", [2**62, 22], b""), ("k", "INT64", [1], i64(1).tobytes()), SEED],
    "biva_graph_encoder": [("images", "FP32", [2**62, 1, 28, 28], b""), ("noise", "FP32", [2**62, 32], b"")],
}
IMAGE = (np.random.default_rng(0).random((1, 1, 28, 28)) > 0.5).astype(np.float32)
GOOD = {  # model -> a good request's inputs and outputs
    "biva_score": ({"images": IMAGE, "seed": i64(1)}, ["elbo"]),
    "biva_encode": ({"images": IMAGE, "seed": i64(1)}, ["z"]),
    "biva_regenerate": ({"z": np.zeros((2, 22), np.float32), "k": i64(1), "seed": i64(1)}, ["images"]),
    "biva_graph_encoder": ({"images": IMAGE, "noise": np.ones((1, 32), np.float32)}, ["z"]),
}


def _grpc_request(model: str, tensors) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest with raw contents: tensors are (name, datatype, declared shape, raw bytes)."""
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, dtype, shape, raw in tensors:
        req.inputs.add(name=name, datatype=dtype, shape=shape)
        req.raw_input_contents.append(raw)
    return req


def _grpc_call(url: str, req: service_pb2.ModelInferRequest, stream: bool = False) -> tuple[grpc.StatusCode, str]:
    """(status, details) of one ModelInfer call, or of a ModelStreamInfer stream carrying this one message."""
    with grpc.insecure_channel(url, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            if stream:
                for answer in stub.ModelStreamInfer(iter([req]), timeout=60):
                    if answer.error_message:
                        return grpc.StatusCode.UNKNOWN, answer.error_message
            else:
                stub.ModelInfer(req, timeout=60)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details()


def test_shape_checks_count_exactly() -> None:
    with pytest.raises(Refused, match="declares 14462247353788288466944 bytes"):
        check_tensor("images", [2**62, 1, 28, 28], "FP32", BODY_LIMIT, "raw_input_contents[0]", nbytes=0)
    with pytest.raises(Refused, match="contents holds 5 values, shape \\[2, 3\\] declares 6"):
        check_tensor("x", [2, 3], "FP32", BODY_LIMIT, "contents", values=5)
    assert check_tensor("x", [2, 3], "INT64", BODY_LIMIT, "contents", values=6) == 48


@pytest.mark.parametrize("model", list(OVERFLOW))
def test_overflowing_shapes_over_grpc_are_refused_and_no_stub_dies(tiny_server, model) -> None:
    """The request that once killed the stub of biva_score, biva_encode or biva_regenerate (and reached a graph
    model's): refused by the gRPC front; the stubs that served before serve after, none reloaded."""
    stubs = set(_stub_pids(tiny_server, model))
    assert stubs
    name = OVERFLOW[model][0][0]
    for stream in (False, True, False):  # two requests once disabled both instances for good
        code, details = _grpc_call(tiny_server.grpc_url, _grpc_request(model, OVERFLOW[model]), stream)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert f"input {name}: shape [4611686018427387904" in details and "body limit" in details, details
    inputs, outputs = GOOD[model]
    assert all(np.isfinite(a).all() for a in infer(tiny_server, "grpc", model, inputs, outputs))
    assert set(_stub_pids(tiny_server, model)) == stubs
    assert f"stub of {model} died" not in tiny_server.log_path.read_text(errors="replace")
    _good(tiny_server)


GRPC_LIES = [  # (a biva_score request's inputs, words its refusal names), raw contents
    ([("images", "FP32", [3, 1, 28, 28], bytes(3136)), SEED],
     "raw_input_contents[0] is 3136 bytes but shape [3, 1, 28, 28] of FP32 is 9408 bytes"),
    ([("images", "FP32", [2**40, 1, 28, 28], bytes(3136)), SEED], "more than the body limit"),
    ([("images", "FP32", [1, 1, 28, 28], bytes(3136)), ("seed", "INT64", [1], bytes(16))],
     "raw_input_contents[1] is 16 bytes but shape [1] of INT64 is 8 bytes"),
    ([("images", "FP32", [-1, 1, 28, 28], b""), SEED], "input images: shape must be a list of at most 8 integers"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tensors,words", GRPC_LIES)
def test_raw_contents_that_lie_are_refused_over_grpc(tiny_server, tensors, words, stream) -> None:
    code, details = _grpc_call(tiny_server.grpc_url, _grpc_request("biva_score", tensors), stream)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (code, details)
    _good(tiny_server)


def test_typed_contents_and_raw_counts_that_lie_are_refused_over_grpc(tiny_server) -> None:
    typed = service_pb2.ModelInferRequest(model_name="biva_score")
    typed.inputs.add(name="images", datatype="FP32", shape=[2, 1, 28, 28]).contents.fp32_contents.extend([0.0] * 784)
    typed.inputs.add(name="seed", datatype="INT64", shape=[1]).contents.int64_contents.append(1)
    code, details = _grpc_call(tiny_server.grpc_url, typed)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "contents holds 784 values, shape [2, 1, 28, 28] " \
        "declares 1568" in details, details
    extra = _grpc_request("biva_score", [("images", "FP32", [1, 1, 28, 28], bytes(3136)), SEED])
    extra.raw_input_contents.append(b"")
    code, details = _grpc_call(tiny_server.grpc_url, extra)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "holds 3 tensors for 2 inputs" in details, details
    typed.inputs[0].shape[0] = 1  # the same request, honest: served
    assert _grpc_call(tiny_server.grpc_url, typed) == (grpc.StatusCode.OK, "")
    _good(tiny_server)


def test_grpc_messages_over_the_body_limit_are_refused(tiny_server) -> None:
    """gRPC's own limit is 2 GiB in Triton; the front's is the HTTP front's body limit. Under it, the model's
    caps still apply (5,000 images to biva_score, whose cap is 1,024)."""
    n = BODY_LIMIT // 3136 + 1
    code, details = _grpc_call(tiny_server.grpc_url, _grpc_request("biva_score", [
        ("images", "FP32", [n, 1, 28, 28], bytes(n * 3136)), SEED]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(BODY_LIMIT) in details, (code, details)
    code, details = _grpc_call(tiny_server.grpc_url, _grpc_request("biva_score", [
        ("images", "FP32", [5000, 1, 28, 28], bytes(5000 * 3136)), SEED]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "caps allow" in details, (code, details)
    _good(tiny_server)


BAD_GRAPH_INPUTS = [  # graph model, inputs, expected words; the tiny model has L = 3, D = 22
    ("biva_graph_sampler", {"temperature": np.array([[np.nan]], np.float32)}, "temperature"),
    ("biva_graph_sampler", {"temperature": np.array([[1e30]], np.float32)}, "temperature"),
    ("biva_graph_sampler", {"temperature": np.array([[0.0]], np.float32)}, "temperature"),
    ("biva_graph_sampler", {"k": np.array([[-1]], np.int64)}, "k: got -1"),
    ("biva_graph_sampler", {"k": np.array([[99]], np.int64)}, "k: got 99"),
    ("biva_graph_sampler", {"z": np.full((1, 22), 3e38, np.float32)}, "z: |value|"),
    ("biva_graph_sampler", {"noise": np.full((1, 22), np.nan, np.float32)}, "noise: contains NaN"),
    ("biva_graph_encoder", {"images": np.full((1, 1, 28, 28), 0.5, np.float32)}, "binary"),
    ("biva_graph_scorer", {"images": np.full((1, 1, 28, 28), -3.0, np.float32)}, "[0, 1]"),
    ("biva_graph_scorer", {"k": np.array([[6]], np.int64)}, "k: got 6"),
]


def _graph_inputs(model: str, over: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = {"biva_graph_sampler": {"z": np.zeros((1, 22), np.float32), "k": np.array([[3]], np.int64),
                             "temperature": np.ones((1, 1), np.float32),
                             "noise": rng.standard_normal((1, 22)).astype(np.float32)}}
    images = (rng.random((1, 1, 28, 28)) > 0.5).astype(np.float32)
    noise = rng.standard_normal((1, 32)).astype(np.float32)
    base["biva_graph_encoder"] = {"images": images, "noise": noise}
    base["biva_graph_scorer"] = {"images": images, "noise": noise[:, None], "k": np.array([[1]], np.int64)}  # (B, S, N)
    return {**base[model], **over}


def _infer_graph(client, mod, model: str, inputs: dict[str, np.ndarray]):
    ins = []
    for name, a in inputs.items():
        t = mod.InferInput(name, list(a.shape), "FP32" if a.dtype == np.float32 else "INT64")
        t.set_data_from_numpy(a)
        ins.append(t)
    return client.infer(model, ins)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_graph_models_validate_their_inputs(tiny_server, tiny_ckpt, protocol) -> None:
    from biva_core.checkpoint import load_model

    model, _ = load_model(tiny_ckpt)
    assert (model.cfg.n_layers, model.latent_dim, model.noise_dim) == (3, 22, 32)
    mod = thttp if protocol == "http" else tgrpc
    client = mod.InferenceServerClient(tiny_server.http_url if protocol == "http" else tiny_server.grpc_url)
    try:
        for name, over, words in BAD_GRAPH_INPUTS:
            with pytest.raises(InferenceServerException) as e:
                _infer_graph(client, mod, name, _graph_inputs(name, over))
            assert words in e.value.message(), (name, e.value.message())
            good = _infer_graph(client, mod, name, _graph_inputs(name, {}))
            assert all(np.isfinite(good.as_numpy(o)).all() for o in ("images", "z", "log_w")
                       if good.get_output(o) is not None)
    finally:
        client.close()


def test_regenerate_with_huge_latents_is_refused(tiny_server) -> None:
    client = tgrpc.InferenceServerClient(tiny_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="z: |value|"):
            _infer_graph(client, tgrpc, "biva_regenerate",
                         {"z": np.full((2, 22), 3e38, np.float32), "k": np.array([1], np.int64)})
    finally:
        client.close()
    _good(tiny_server)


# ---- a stub that dies: the supervisor reloads its model ------------------------------------------

def _ready_code(server, path: str) -> int:
    return _raw(server, "GET", path)[0]


def _wait_serving(server, seconds: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            _score_one(server)
            return time.monotonic() - t0
        except InferenceServerException:
            time.sleep(0.25)
    raise AssertionError(f"biva_score did not recover within {seconds} s")


def _score_one(server) -> np.ndarray:
    client = tgrpc.InferenceServerClient(server.grpc_url)
    try:
        x = tgrpc.InferInput("images", [1, 1, 28, 28], "FP32")
        x.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
        s = tgrpc.InferInput("seed", [1], "INT64")
        s.set_data_from_numpy(np.array([1], np.int64))
        return client.infer("biva_score", [x, s], client_timeout=60).as_numpy("elbo")
    finally:
        client.close()


def _stub_pids(server, model: str) -> list[int]:
    from biva_serving.supervisor import list_stubs

    triton = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == server.process.pid]
    return [pid for t in triton for pid, s in list_stubs(t).items() if s.model == model]


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.fixture
def own_server(tiny_repo, tmp_path):
    """A server of this test's own: these tests kill stubs."""
    from biva_serving.process import start_server

    from biva_serving.supervisor import list_stubs

    regions: set[str] = set()
    with start_server(tiny_repo, log_path=tmp_path / "server.log") as server:
        yield server
        triton = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == server.process.pid]
        regions = {s.shm_region for t in triton for s in list_stubs(t).values()}
    assert regions
    leaked = regions & set(os.listdir("/dev/shm"))
    assert not leaked, f"shared-memory regions left in /dev/shm: {leaked}"


def _grpc_ready_while_reloading(server) -> dict[str, bool]:
    """gRPC's ServerReady and ModelReady(biva_score), False if either said not ready while HTTP said so."""
    said = {"server": True, "biva_score": True}
    client = tgrpc.InferenceServerClient(server.grpc_url)
    try:
        t0 = time.monotonic()
        while _ready_code(server, "/v2/models/biva_score/ready") != 200 and time.monotonic() - t0 < 60:
            said["server"] &= client.is_server_ready()
            said["biva_score"] &= client.is_model_ready("biva_score")
            time.sleep(0.05)
    finally:
        client.close()
    return said


@pytest.mark.slow
def test_a_killed_stub_is_noticed_within_seconds_and_reloaded(own_server) -> None:
    before = _score_one(own_server)
    pids = _stub_pids(own_server, "biva_graph_scorer")
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while _ready_code(own_server, "/v2/models/biva_score/ready") == 200:
        assert time.monotonic() - t0 < 5, "the dead stub was not noticed within 5 s"
        time.sleep(0.05)
    noticed = time.monotonic() - t0
    grpc_said = _grpc_ready_while_reloading(own_server)
    assert grpc_said == {"server": False, "biva_score": False}, grpc_said
    recovered = _wait_serving(own_server, 60)
    assert np.array_equal(_score_one(own_server), before)  # same request, same program on this machine: equal
    assert _ready_code(own_server, "/v2/health/ready") == 200
    print(f"dead scorer stub: not ready after {noticed:.2f} s, serving again {recovered:.1f} s later")
    _good(own_server)


def test_requests_larger_than_the_caps_allow_are_refused_before_the_stub(tiny_server) -> None:
    """5,000 images of binary data to biva_score (cap: 1,024): refused by the front, so the stub's shared
    memory never grows to hold them."""
    head = _infer_json([{"name": "images", "shape": [5000, 1, 28, 28], "datatype": "FP32",
                         "parameters": {"binary_data_size": 5000 * 784 * 4}}])
    body = head + bytes(5000 * 784 * 4)
    status, answer = _raw(tiny_server, "POST", "/v2/models/biva_score/infer", body,
                          {"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and b"caps allow" in answer
    _good(tiny_server)


def test_expect_continue_and_other_methods(tiny_server) -> None:
    body = _infer_json([{"name": "n", "shape": [1], "datatype": "INT64", "data": [2]}])
    with socket.create_connection(("127.0.0.1", tiny_server.http_port), timeout=30) as s:
        s.sendall(b"POST /v2/models/biva_sample/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
    for method in ("PUT", "DELETE", "HEAD"):
        assert _raw(tiny_server, method, "/v2/health/ready")[0] == 405
    _good(tiny_server)


def test_tritons_own_grpc_endpoint_needs_the_fronts_secret(tiny_server) -> None:
    """Triton's gRPC endpoint (a private loopback port, kept out of what the user reads and named in Triton's own
    log, whose path the launcher's first line gives) answers no one but the front: not even health or inference
    without the per-start secret."""
    text = tiny_server.log_path.read_text(errors="replace")
    assert "GRPCInferenceService" not in text  # the private ports stay out of the user's log
    full = Path(text.split("Triton's whole log: ")[1].split()[0]).read_text(errors="replace")
    private = full.split("Started GRPCInferenceService at ")[1].split()[0].strip('"')
    assert private != tiny_server.grpc_url
    client = tgrpc.InferenceServerClient(private)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.is_server_live()
    finally:
        client.close()
    _good(tiny_server)


def test_biva_client_reads_the_grpc_fronts_refusals(tiny_server) -> None:
    """Over the body limit or a lie: the request's fault, never retried; the front's concurrent-RPC limit: busy."""
    from biva_client.api import BivaClient, ServerBusy, ServerError

    n = BODY_LIMIT // 3136 + 1
    client = tgrpc.InferenceServerClient(tiny_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as big:
            _infer_graph(client, tgrpc, "biva_score", {"images": np.zeros((n, 1, 28, 28), np.float32),
                                                       "seed": i64(1)})
    finally:
        client.close()
    with BivaClient(tiny_server.grpc_url, "grpc") as biva:
        refused = biva._classify(big.value, "score")
        assert isinstance(refused, ServerError) and not refused.transient, refused
        assert refused.status == "StatusCode.RESOURCE_EXHAUSTED"
        limit = InferenceServerException("Concurrent RPC limit exceeded!", status="StatusCode.RESOURCE_EXHAUSTED")
        assert isinstance(biva._classify(limit, "score"), ServerBusy)
    _good(tiny_server)


def test_a_stream_is_relayed_until_a_message_lies(tiny_server) -> None:
    """ModelStreamInfer: a good message is answered through the front; a lie after it ends the stream with
    INVALID_ARGUMENT, and the next stream is served."""
    import threading

    good = _grpc_request("biva_score", [("images", "FP32", [1, 1, 28, 28], IMAGE.tobytes()), SEED])
    lie = _grpc_request("biva_score", [("images", "FP32", [2**62, 1, 28, 28], b""), SEED])
    answered = threading.Event()

    def messages():
        yield good
        answered.wait(60)
        yield lie

    with grpc.insecure_channel(tiny_server.grpc_url) as channel:
        responses = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(messages(), timeout=60)
        first = next(responses)
        answered.set()
        assert not first.error_message and first.infer_response.model_name == "biva_score"
        with pytest.raises(grpc.RpcError) as e:
            next(responses)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input images" in e.value.details()
    assert _grpc_call(tiny_server.grpc_url, good, stream=True) == (grpc.StatusCode.OK, "")
    _good(tiny_server)
