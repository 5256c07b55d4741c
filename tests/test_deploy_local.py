"""deploy/local.py: replicas of `tritonserver` behind HAProxy, generated from deploy/k8s/base/deployment.yaml, under
load while replicas are killed, terminated and rolled.

The load: 2 HTTP + 2 gRPC threads of raw tritonclient (NO client retries: every failure HAProxy does not absorb is
counted), seeded biva_sample requests through the balancer (32/s in all), every answer compared with the reference computed
once per seed from one replica directly (within IMAGE_ATOL: see there why not bit for bit under load). Each phase
asserts zero failed requests and logs its timing.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from biva_deploy.local import (DEPLOYMENT_YAML, LocalDeployment, family, haproxy_config, load_container, replica_args,
                               start_replica, still_alive, wait_started)
from biva_serving.net import LOOPBACK, free_ports

SEEDS = list(range(12))
N = 3  # images per sample request
THREADS = {"http": 2, "grpc": 2}
MAX_REQUESTS_PER_THREAD = 3000
MAX_PHASE_S = 150  # a load never runs longer than this, whatever happens
RATE_PER_THREAD = 8.0  # requests/s per thread (32/s in all): steady traffic that leaves the 2 cores room to restart
# Exact equality holds for one request at a time, but not always under load: the graph models' dynamic batcher
# merges concurrent requests, and ONNX Runtime's sums over a batch of another size can differ in the last bits.
# So: answers must be equal within IMAGE_ATOL (biva-export validates images at 1e-4), and inexact ones are counted.
IMAGE_ATOL = 1e-5
TIMINGS: dict[str, float] = {}

needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")


def _log(msg: str) -> None:
    print(f"[deploy-local {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- no server --------------------------------------------------------------------------------------------------
def test_facts_come_from_the_deployment_yaml() -> None:
    spec = load_container()
    assert spec.ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert spec.readiness.path == "/v2/health/ready" and spec.liveness.path == "/v2/health/live"
    assert spec.grace_s == 40 and spec.exit_timeout_s == 20 and spec.prestop_s == 5
    args = replica_args(spec, "/r", {"http": 1, "grpc": 2, "metrics": 3})
    assert len(args) == len(spec.args)  # one for one: only values are mapped
    assert "--model-repository=/r" in args and "--http-port=1" in args and "--metrics-port=3" in args
    assert "--grpc-address=127.0.0.1" in args and "--exit-timeout-secs=20" in args
    assert not any("0.0.0.0" in a or "=800" in a for a in args)


@needs_haproxy
def test_haproxy_config_is_valid_and_follows_the_yaml(tmp_path) -> None:
    import subprocess

    from biva_deploy.local import Replica

    spec = load_container()
    reps = [Replica(i, dict(zip(spec.ports, free_ports(3))), tmp_path / f"r{i}.log") for i in range(2)]
    cfg = haproxy_config(spec, reps, 18000, 18001, tmp_path / "s.sock", 18002)
    (tmp_path / "h.cfg").write_text(cfg)
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "h.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"option httpchk GET {spec.readiness.path}" in cfg
    assert "retry-on conn-failure empty-response response-timeout 502 503" in cfg
    assert "option http-buffer-request" in cfg and "option redispatch" in cfg
    for r in reps:
        assert f"{LOOPBACK}:{r.ports['http']} check" in cfg
        assert f"{LOOPBACK}:{r.ports['grpc']} proto h2 check port {r.ports['http']} check-proto h1" in cfg


# ---- a live deployment ------------------------------------------------------------------------------------------
def _sample(client, mod, seed: int, n: int = N, **kw) -> np.ndarray:
    ins = []
    for name, a in {"n": np.array([n], np.int64), "seed": np.array([seed], np.int64)}.items():
        t = mod.InferInput(name, [1], "INT64")
        t.set_data_from_numpy(a)
        ins.append(t)
    res = client.infer("biva_sample", ins, outputs=[mod.InferRequestedOutput("images")], **kw)
    return res.as_numpy("images")


def _client(protocol: str, url: str):
    if protocol == "http":
        import tritonclient.http as m
        return m, m.InferenceServerClient(url, connection_timeout=60, network_timeout=60)
    import tritonclient.grpc as m
    return m, m.InferenceServerClient(url)


def _successes(replica, model: str = "biva_sample") -> int:
    """Successful inferences of `model` on this replica (its own HTTP port: Triton's statistics)."""
    with urllib.request.urlopen(f"http://{replica.http_url}/v2/models/{model}/stats", timeout=5) as r:
        stats = json.load(r)["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


def _wait(cond, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


class Load:
    """THREADS client threads through the balancer, each bounded by MAX_REQUESTS_PER_THREAD and MAX_PHASE_S."""

    def __init__(self, d: LocalDeployment, reference: dict[int, np.ndarray]):
        self.d, self.reference = d, reference
        self.stop_event = threading.Event()
        self.ok = 0
        self.inexact: list[float] = []  # max |difference| of answers equal within IMAGE_ATOL but not bit for bit
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(p, k), daemon=True)
                        for p, n in THREADS.items() for k in range(n)]

    def _run(self, protocol: str, k: int) -> None:
        mod, client = _client(protocol, self.d.http_url if protocol == "http" else self.d.grpc_url)
        t_end = time.monotonic() + MAX_PHASE_S
        next_t = time.monotonic()
        try:
            for i in range(MAX_REQUESTS_PER_THREAD):
                if self.stop_event.wait(max(0.0, next_t - time.monotonic())) or time.monotonic() > t_end:
                    break
                next_t = max(next_t + 1 / RATE_PER_THREAD, time.monotonic() - 1)
                seed = SEEDS[(i * 5 + k) % len(SEEDS)]
                try:
                    images = _sample(client, mod, seed, **({} if protocol == "http" else {"client_timeout": 60}))
                    ref = self.reference[seed]
                    diff = float(np.abs(images - ref).max()) if images.shape == ref.shape else float("inf")
                    err = None if diff <= IMAGE_ATOL else \
                        f"{protocol} seed {seed}: answer differs from the reference by {diff:.3g}"
                    if 0 < diff <= IMAGE_ATOL:
                        with self.lock:
                            self.inexact.append(diff)
                except Exception as e:  # noqa: BLE001 - every failure counts
                    err = f"{protocol}: {type(e).__name__}: {str(e)[:200]}"
                    # a fresh connection after a failure (raw tritonclient, no retry of this request)
                    with contextlib.suppress(Exception):
                        client.close()
                    mod, client = _client(protocol, self.d.http_url if protocol == "http" else self.d.grpc_url)
                with self.lock:
                    if err:
                        self.failures.append(err)
                    else:
                        self.ok += 1
        finally:
            with contextlib.suppress(Exception):
                client.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=90)

    def wait_requests(self, n: int, timeout: float = 60) -> None:
        start = self.ok + len(self.failures)
        _wait(lambda: self.ok + len(self.failures) >= start + n, timeout, f"{n} more requests through the balancer")


@pytest.fixture(scope="module")
def deployment(tiny_repo, tmp_path_factory):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed")
    t0 = time.monotonic()
    d = LocalDeployment(tiny_repo, replicas=2, work_dir=tmp_path_factory.mktemp("replicas"), log=_log)
    with d:
        TIMINGS["start"] = time.monotonic() - t0
        _log(f"deployment up in {TIMINGS['start']:.1f} s; work dir {d.work}")
        yield d
    _log("phase timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def reference(deployment) -> dict[int, np.ndarray]:
    """Each seed's images from replica 0 directly; replica 1 and gRPC give exactly the same."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    r0, r1 = deployment.replicas
    c0, c1 = thttp.InferenceServerClient(r0.http_url), thttp.InferenceServerClient(r1.http_url)
    g1 = tgrpc.InferenceServerClient(r1.grpc_url)
    try:
        ref = {s: _sample(c0, thttp, s) for s in SEEDS}
        for s in SEEDS:
            assert np.array_equal(_sample(c1, thttp, s), ref[s]), f"seed {s}: replicas differ"
            assert np.array_equal(_sample(g1, tgrpc, s), ref[s]), f"seed {s}: gRPC differs from HTTP"
    finally:
        c0.close(), c1.close(), g1.close()
    assert not np.array_equal(ref[0], ref[1])
    return ref


def _assert_clean(load: Load, phase: str, t0: float) -> None:
    TIMINGS[phase] = time.monotonic() - t0
    inexact = f" ({len(load.inexact)} not bit-identical, max |diff| {max(load.inexact):.2g})" if load.inexact else ""
    _log(f"{phase}: {load.ok} answers{inexact}, {len(load.failures)} failures in {TIMINGS[phase]:.1f} s")
    assert not load.failures, f"{phase}: {len(load.failures)} failed of {load.ok + len(load.failures)}: " \
                              f"{load.failures[:5]}"
    assert load.ok > 0


@pytest.mark.server
@pytest.mark.slow
def test_a_steady_both_replicas_serve_identically(deployment, reference) -> None:
    t0 = time.monotonic()
    before = [_successes(r) for r in deployment.replicas]
    with Load(deployment, reference) as load:
        load.wait_requests(40)
        _wait(lambda: all(_successes(r) > b + 5 for r, b in zip(deployment.replicas, before)), 30,
              "both replicas serving through the balancer")
    _assert_clean(load, "a_steady", t0)


def _kill_phase(deployment, reference, i: int, group: bool, phase: str) -> None:
    t0 = time.monotonic()
    r = deployment.replicas[i]
    with Load(deployment, reference) as load:
        load.wait_requests(20)
        members = {p: v for p, v in family(r.pid).items() if p != r.pid}
        assert any(c == "tritonserver" for _, c in members.values()), members  # the Triton binary under the launcher
        starts, killed_before = r.starts, len(r.orphans_killed)
        t_kill = time.monotonic()
        deployment.kill(i, signal.SIGKILL, group=group)
        # nothing of the killed replica outlives it for more than a few seconds (Triton, the python stubs)
        _wait(lambda: not still_alive(members), 15, f"replica {i}'s processes gone")
        _log(f"{phase}: the killed replica's {len(members)} processes gone {time.monotonic() - t_kill:.1f} s "
             "after the kill")
        deployment.wait_restarted(i, starts, timeout=90)
        t_back = time.monotonic() - t_kill
        _wait(lambda: _successes(deployment.replicas[i]) > 3, 30, f"restarted replica {i} serving")
        load.wait_requests(20)
    _log(f"{phase}: replica {i} routed again {t_back:.1f} s after the kill")
    _wait(lambda: len(r.orphans_killed) > killed_before, 25, "the group check")
    assert r.orphans_killed[-1] == {}, f"the deployment had to kill {r.orphans_killed[-1]}"
    _assert_clean(load, phase, t0)


@pytest.mark.server
@pytest.mark.slow
def test_b_sigkill_of_the_launcher_only(deployment, reference) -> None:
    _kill_phase(deployment, reference, 0, group=False, phase="b_sigkill_launcher")


@pytest.mark.server
@pytest.mark.slow
def test_c_sigkill_of_the_whole_group(deployment, reference) -> None:
    _kill_phase(deployment, reference, 1, group=True, phase="c_sigkill_group")


@pytest.mark.server
@pytest.mark.slow
def test_d_sigterm_drains_in_flight_requests(deployment, reference) -> None:
    """SIGTERM to a replica's launcher mid-load: the balancer loses nothing, the requests in flight at that replica
    (slow ones on its own port) are answered 200, and it exits within the drain deadline and the grace period."""
    import tritonclient.http as thttp

    spec = deployment.spec
    t0 = time.monotonic()
    r = deployment.replicas[0]
    starts = r.starts
    results: list[tuple[str, float]] = []
    x = (np.random.default_rng(0).random((4, 1, 28, 28)) > 0.5).astype(np.float32)

    def score(c) -> np.ndarray:
        # 4 images x 1,000 draws: 4,000 scorer rows, under HEAVY_ROWS (4,096), so never refused as heavy
        ins = []
        for name, a in {"images": x, "iw": np.array([1000], np.int64), "seed": np.array([7], np.int64)}.items():
            t = thttp.InferInput(name, list(a.shape), "FP32" if a.dtype == np.float32 else "INT64")
            t.set_data_from_numpy(a)
            ins.append(t)
        return c.infer("biva_score", ins, outputs=[thttp.InferRequestedOutput("iw_bound")]).as_numpy("iw_bound")

    def slow() -> None:
        c = thttp.InferenceServerClient(r.http_url, connection_timeout=60, network_timeout=60)
        try:
            v = score(c)
            results.append(("ok" if v.shape == (4,) and np.isfinite(v).all() else f"bad {v}", time.monotonic()))
        except Exception as e:  # noqa: BLE001
            results.append((f"{type(e).__name__}: {str(e)[:200]}", time.monotonic()))
        finally:
            c.close()

    c = thttp.InferenceServerClient(r.http_url, connection_timeout=60, network_timeout=60)
    t_s = time.monotonic()
    score(c)
    one = time.monotonic() - t_s  # how long one slow request takes here, alone
    c.close()

    with Load(deployment, reference) as load:
        load.wait_requests(20)
        base = _successes(r)
        holders = [threading.Thread(target=slow) for _ in range(2)]
        for t in holders:
            t.start()
        # a third of one's time alone: sent and running when the signal lands (checked below by their end times)
        time.sleep(one / 3)
        proc = r.handle.process
        t_term = time.monotonic()
        deployment.kill(0, signal.SIGTERM)
        _wait(lambda: proc.poll() is not None, spec.grace_s, "the terminated replica to exit", step=0.05)
        t_exit = time.monotonic() - t_term
        for t in holders:
            t.join(timeout=60)
        deployment.wait_restarted(0, starts, timeout=90)
        load.wait_requests(20)
    _log(f"d_sigterm: one slow request alone {one:.2f} s; replica exited {t_exit:.1f} s after SIGTERM (code {proc.returncode}); slow requests: "
         f"{[(s, round(t - t_term, 2)) for s, t in results]}; {_successes(r)} served since its restart "
         f"({base} before)")
    assert len(results) == 2 and all(s == "ok" for s, _ in results), results
    assert any(t > t_term for _, t in results), "no slow request was still in flight at SIGTERM: make them slower"
    assert t_exit <= spec.grace_s, f"exited {t_exit:.1f} s after SIGTERM, past the grace period {spec.grace_s} s"
    # the launcher's drain deadline (--exit-timeout-secs) plus Triton's own exit (5 s, the YAML's budget)
    assert t_exit <= spec.exit_timeout_s + 5, t_exit
    _assert_clean(load, "d_sigterm", t0)


@pytest.mark.server
@pytest.mark.slow
def test_e_rolling_restart(deployment, reference) -> None:
    t0 = time.monotonic()
    with Load(deployment, reference) as load:
        load.wait_requests(20)
        took = deployment.rolling_restart()
        load.wait_requests(20)
    _log(f"e_rolling: each replica out and back in {[round(t, 1) for t in took]} s")
    assert all(s == "UP" for s in deployment.states().values()), deployment.states()
    _assert_clean(load, "e_rolling_restart", t0)


@pytest.mark.server
@pytest.mark.slow
def test_one_replica_with_the_deployments_args_answers_every_probe(tiny_repo, tmp_path) -> None:
    """Exactly the container's args (ports -> free loopback ports, 0.0.0.0 -> 127.0.0.1, /models -> the repo):
    every probe path on its named port answers as the kubelet expects, the metrics port serves Prometheus text,
    the gRPC port answers ServerReady."""
    import tritonclient.grpc as tgrpc

    spec = load_container(DEPLOYMENT_YAML)
    ports = dict(zip(spec.ports, free_ports(len(spec.ports))))
    t0 = time.monotonic()
    handle = start_replica(spec, tiny_repo, ports, tmp_path / "replica.log")
    try:
        wait_started(spec, handle, spec.start_budget_s())
        for kind, probe in (("startup", spec.startup), ("readiness", spec.readiness), ("liveness", spec.liveness)):
            url = f"http://{LOOPBACK}:{ports[probe.port]}{probe.path}"
            with urllib.request.urlopen(url, timeout=probe.timeout_s) as r:
                assert r.status == 200, (kind, url)
        with urllib.request.urlopen(f"http://{LOOPBACK}:{ports['metrics']}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "nv_inference_request_success" in text and "# TYPE" in text
        g = tgrpc.InferenceServerClient(f"{LOOPBACK}:{ports['grpc']}")
        try:
            assert g.is_server_ready() and g.is_server_live()
        finally:
            g.close()
        cmdline = Path(f"/proc/{handle.process.pid}/cmdline").read_bytes().split(b"\0")
        assert [a.decode() for a in cmdline if a.startswith(b"--")] == replica_args(spec, tiny_repo, ports)
    finally:
        handle.stop()
    TIMINGS["probes"] = time.monotonic() - t0
    _log(f"probes: one replica started, probed and stopped in {TIMINGS['probes']:.1f} s")
