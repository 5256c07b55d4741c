"""Issue 30: one replica as a kubelet and a load balancer see it (SIGKILL and restarts of replicas behind a
balancer: tests/test_deploy_local.py). SIGTERM drains (not ready at once, in-flight requests answered 200, new ones
refused with a status a balancer retries, exit within the drain deadline); health and readiness answer within a
small bound while large bodies arrive and while scoring saturates the machine; the autoscaling counters rise.
Real `tritonserver` processes on loopback."""
from __future__ import annotations

import http.client
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from biva_serving.process import start_server
from serving_helpers import i64

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(400)]
PROBE_BOUND_S = 0.5  # half of Kubernetes' default probe timeout (1 s)


def _get(port: int, path: str) -> tuple[int, float, bytes]:
    """(status, seconds, body) of one GET on a fresh connection, as a kubelet's probe makes it."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, time.monotonic() - t0, r.read()
    finally:
        conn.close()


def _score(url: str, images: np.ndarray, iw: int) -> np.ndarray:
    client = thttp.InferenceServerClient(url, network_timeout=300)
    try:
        x = thttp.InferInput("images", list(images.shape), "FP32")
        x.set_data_from_numpy(images)
        k = thttp.InferInput("iw", [1], "INT64")
        k.set_data_from_numpy(i64(iw))
        return client.infer("biva_score", [x, k]).as_numpy("elbo")
    finally:
        client.close()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 1, 28, 28)) > 0.5).astype(np.float32)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tiny_repo, tmp_path):
    drain_s = 60  # generous: the in-flight requests below take seconds on a loaded machine
    server = start_server(tiny_repo, log_path=tmp_path / "drain.log", extra_args=[f"--exit-timeout-secs={drain_s}"])
    try:
        images = _images(16)
        t0 = time.monotonic()
        reference = _score(server.http_url, images, 16)
        one = time.monotonic() - t0
        iw = int(np.clip(16 * 1.0 / max(one, 1e-3), 16, 256))  # about 1 s a request, sized from what it measures
        results: list[object] = []

        def in_flight() -> None:
            try:
                results.append(_score(server.http_url, images, iw))
            except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                results.append(e)

        threads = [threading.Thread(target=in_flight) for _ in range(2)]  # more would wait out the queue (429)
        for t in threads:
            t.start()
        time.sleep(0.5)
        stopped_at = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        # not ready at once, still alive; new requests refused with what a balancer retries
        deadline = time.monotonic() + 10
        while _get(server.http_port, "/v2/health/ready")[0] != 503:
            assert time.monotonic() < deadline, "still ready 10 s after SIGTERM"
            time.sleep(0.05)
        assert _get(server.http_port, "/v2/health/live")[0] == 200
        with pytest.raises(InferenceServerException) as refused:
            _score(server.http_url, images[:1], 1)
        assert refused.value.status() == "503" and "shutting down" in refused.value.message()
        grpc_client = tgrpc.InferenceServerClient(server.grpc_url)  # gRPC stopped gracefully: new calls go elsewhere
        try:
            n = tgrpc.InferInput("n", [1], "INT64")
            n.set_data_from_numpy(i64(1))
            with pytest.raises(InferenceServerException) as unavailable:
                grpc_client.infer("biva_sample", [n], client_timeout=10)
            assert "UNAVAILABLE" in str(unavailable.value.status()), unavailable.value
        finally:
            grpc_client.close()
        for t in threads:
            t.join()
        code = server.process.wait(drain_s + 30)
        took = time.monotonic() - stopped_at
    finally:
        server.stop()
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    assert len(results) == 2 and all(r.shape == reference.shape for r in results)
    log = (tmp_path / "drain.log").read_text(errors="replace")
    drained = [line for line in log.splitlines() if "SIGTERM: not ready; draining" in line]
    assert drained and int(drained[0].split("draining ")[1].split()[0]) >= 1, drained  # they were in flight
    assert "drain deadline passed" not in log
    assert code == 0 and took < drain_s, (code, took)


def _probe_worst(server, busy: threading.Event) -> tuple[float, float, int]:
    """Worst HTTP ready and gRPC ServerReady latency while `busy` is set, and the number of probe rounds."""
    grpc_client = tgrpc.InferenceServerClient(server.grpc_url)
    worst_http = worst_grpc = 0.0
    rounds = 0
    try:
        while busy.is_set():
            status, took, _ = _get(server.http_port, "/v2/health/ready")
            assert status == 200
            worst_http = max(worst_http, took)
            t0 = time.monotonic()
            assert grpc_client.is_server_ready(client_timeout=10)
            worst_grpc = max(worst_grpc, time.monotonic() - t0)
            rounds += 1
            time.sleep(0.05)
    finally:
        grpc_client.close()
    return worst_http, worst_grpc, rounds


def test_health_answers_within_the_bound_under_large_bodies_and_saturated_scoring(tiny_server):
    idle = statistics.median(_get(tiny_server.http_port, "/v2/health/ready")[1] for _ in range(10))
    bound = max(PROBE_BOUND_S, 10 * idle)  # on a machine so loaded that an idle probe is slow, 10x that
    images = 12_000  # a 47 MB JSON body: under the body limit, over the model's caps
    big = (b'{"inputs":[{"name":"images","shape":[%d,1,28,28],"datatype":"FP32","data":[' % images
           + b"0.5," * (images * 784 - 1) + b'0.5]}]}')
    answers: list[int] = []

    def send_big() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", tiny_server.http_port, timeout=300)
        try:
            conn.request("POST", "/v2/models/biva_score/infer", body=big)
            r = conn.getresponse()
            answers.append(r.status)
            r.read()
        finally:
            conn.close()

    def score_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            answers.append(_score(tiny_server.http_url, _images(8), 8).size)

    for load, n in ((send_big, 3), (lambda: score_for(8.0), 6)):
        busy = threading.Event()
        busy.set()
        threads = [threading.Thread(target=load) for _ in range(n)]
        for t in threads:
            t.start()
        prober = []
        probe = threading.Thread(target=lambda: prober.append(_probe_worst(tiny_server, busy)))
        probe.start()
        for t in threads:
            t.join()
        busy.clear()
        probe.join()
        worst_http, worst_grpc, rounds = prober[0]
        print(f"{load.__name__ if n == 3 else 'scoring'}: worst ready {worst_http:.3f} s (HTTP), {worst_grpc:.3f} s "
              f"(gRPC) over {rounds} rounds; idle {idle:.4f} s")
        assert rounds >= 3
        assert worst_http <= bound and worst_grpc <= bound, (worst_http, worst_grpc, bound)
    assert answers.count(400) == 3  # the large bodies were refused (over the caps), not lost


def _metrics(port: int) -> dict[tuple[str, str], float]:
    """(metric, model) -> value of Triton's per-model counters on its metrics port (Prometheus text)."""
    status, _, body = _get(port, "/metrics")
    assert status == 200
    out: dict[tuple[str, str], float] = {}
    for line in body.decode().splitlines():
        if line.startswith("nv_inference_") and 'model="' in line:
            name, labels = line.split("{", 1)
            model = labels.split('model="', 1)[1].split('"', 1)[0]
            out[(name, model)] = out.get((name, model), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_the_autoscaling_counters_exist_and_rise_under_load(tiny_server):
    """The counters deploy/prometheus/rules.yml reads (queue and compute time) and the success count, per model:
    present on the metrics port the manifests scrape, and rising while requests are served."""
    rules = yaml.safe_load((Path(__file__).parent.parent / "deploy/prometheus/rules.yml").read_text())
    expr = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    counters = ["nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"]
    assert all(c in expr for c in counters), expr
    counters.append("nv_inference_request_success")
    before = _metrics(tiny_server.metrics_port)
    threads = [threading.Thread(target=lambda: [_score(tiny_server.http_url, _images(4), 4) for _ in range(5)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    success = ("nv_inference_request_success", "biva_score")
    deadline = time.monotonic() + 30  # Triton counts a request after its answer is sent: let the last ones land
    while (after := _metrics(tiny_server.metrics_port)).get(success, 0.0) - before.get(success, 0.0) < 20:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for model in ("biva_score", "biva_graph_scorer"):
        for name in counters:
            assert (name, model) in after, (name, model, sorted(after)[:20])
            assert after[(name, model)] > before.get((name, model), 0.0), (name, model)
    assert after[success] - before.get(success, 0.0) == 20
