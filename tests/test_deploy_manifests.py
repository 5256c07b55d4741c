"""The Kubernetes deployment (deploy/k8s), its monitoring rules (deploy/prometheus) and images (deploy/docker),
checked offline: no API server or Docker engine can run here.

- `kubectl kustomize` renders each overlay and the KServe folder (skipped when kubectl is missing);
- every built-in resource passes `python -m kubernetes_validate --strict` for Kubernetes 1.29 and 1.32;
- custom resources (Gateway API routes, Prometheus Operator, KServe) have no schema there: the fields that tie
  them together (Service names and ports, labels, metric names, args) are checked here;
- `promtool test rules` runs the recording rule's unit test (skipped when promtool is missing).

Run: OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_deploy_manifests.py
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
PROM = ROOT / "deploy" / "prometheus"
DOCKER = ROOT / "deploy" / "docker"

TARGETS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu", "kserve": K8S / "kserve"}
K8S_VERSIONS = ["1.29", "1.32"]
# Kinds kubernetes-validate has no schema for ("couldn't find schema"): checked field by field below.
CUSTOM_KINDS = {"Gateway", "HTTPRoute", "GRPCRoute", "ServiceMonitor", "PrometheusRule", "ServingRuntime",
                "InferenceService"}
NVIDIA_TRITON = "/opt/tritonserver/bin/tritonserver"

KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed: it is on the "
                                   "machine image, not a Debian package; nothing to render the manifests with")


def render(target: str) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(TARGETS[target])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {TARGETS[target]} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return {t: render(t) for t in TARGETS}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(deploy: dict, name: str = "tritonserver") -> dict:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name}= appears {len(values)} times in {args}"
    return values[0]


def rules_file_groups() -> list:
    return yaml.safe_load((PROM / "rules.yml").read_text())["groups"]


# --- rendering and schemas -------------------------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_overlay_renders_the_whole_replica(rendered, target):
    kinds = sorted(d["kind"] for d in rendered[target])
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Service", "Service", "Deployment", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "Gateway", "HTTPRoute", "GRPCRoute", "ServiceMonitor",
                            "PrometheusRule"])
    for d in rendered[target]:
        if d["kind"] != "ConfigMap" or d["metadata"]["name"] != "prometheus-adapter":
            assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "biva", d["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", list(TARGETS))
def test_builtin_resources_pass_kubernetes_validate(rendered, target, version, tmp_path):
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    docs = rendered[target]
    path = tmp_path / f"{target}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)],
                         capture_output=True, text=True, timeout=120)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    for d in builtin:
        assert f"passed for resource {d['kind'].lower()}/{d['metadata']['name']} against version {version}" in log
    # Every warning is a custom resource without a schema, nothing else.
    warned = re.findall(r"Couldn't find schema for kind (\w+)", log)
    assert sorted(warned) == sorted(d["kind"] for d in docs if d["kind"] in CUSTOM_KINDS)
    assert "ERROR" not in log and "failed" not in log.lower()


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path):
    """The control for the test above: --strict does reject what the API server would prune or refuse."""
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    deployment["spec"]["selector"] = {"matchLabels": {"app": "x"}}
    deployment["spec"]["template"]["metadata"] = {"labels": {"app": "x"}}
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(deployment))
    container(deployment)["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    bad.write_text(yaml.safe_dump(deployment))
    run = lambda p: subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSIONS[-1],
                                    str(p)], capture_output=True, text=True, timeout=120)
    assert run(good).returncode == 0
    assert run(bad).returncode != 0


# --- the Deployment's facts ------------------------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_deployment_keeps_its_ports_probes_and_drain(rendered, target):
    deploy = one(rendered[target], "Deployment", "biva")
    c = container(deploy)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert int(flag(c["args"], "http-port")) == ports["http"]
    assert int(flag(c["args"], "grpc-port")) == ports["grpc"]
    assert int(flag(c["args"], "metrics-port")) == ports["metrics"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@needs_kubectl
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_grace_period_covers_prestop_drain_and_exit(rendered, target):
    pod = one(rendered[target], "Deployment", "biva")["spec"]["template"]["spec"]
    c = container(one(rendered[target], "Deployment", "biva"))
    sleep_cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_cmd[0] == "sleep"
    pre_stop = int(sleep_cmd[1])
    drain = int(flag(c["args"], "exit-timeout-secs"))
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 5


@needs_kubectl
@pytest.mark.parametrize("target,tag", [("cpu", "0.1.0-cpu"), ("gpu", "0.1.0-gpu")])
def test_overlay_images_and_repository(rendered, target, tag):
    docs = rendered[target]
    pod = one(docs, "Deployment", "biva")["spec"]["template"]["spec"]
    images = {c["name"]: c["image"] for c in pod["containers"] + pod["initContainers"]}
    assert images == {"tritonserver": f"biva-serving:{tag}", "fetch-repository": f"biva-serving:{tag}"}
    # The init container reads the generated (hash-suffixed) ConfigMap: kustomize rewrote the reference.
    init = pod["initContainers"][0]
    assert init["command"] == ["biva-fetch"] and init["args"] == ["$(BIVA_REPOSITORY_URL)", "/models"]
    refs = [e["configMapRef"]["name"] for e in init["envFrom"] if "configMapRef" in e]
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("biva-repository")]
    assert len(cms) == 1 and refs == [cms[0]["metadata"]["name"]]
    assert cms[0]["metadata"]["name"] != "biva-repository"  # content-hashed: a new URL rolls the pods
    data = cms[0]["data"]
    assert data["BIVA_REPOSITORY_URL"].startswith("s3://biva-models/ood28")
    assert not data.get("AWS_ENDPOINT_URL")  # unset: AWS S3 itself
    if target == "cpu":
        assert data["BIVA_REPOSITORY_URL"] == "s3://biva-models/ood28"


@needs_kubectl
def test_gpu_overlay_runs_nvidia_triton_on_one_gpu(rendered):
    cpu, gpu = (one(rendered[t], "Deployment", "biva") for t in ("cpu", "gpu"))
    c_gpu, c_cpu = container(gpu), container(cpu)
    assert c_gpu["command"] == [NVIDIA_TRITON]
    assert c_cpu["command"] == ["tritonserver"]
    assert c_gpu["args"] == c_cpu["args"]  # same ports and drain
    assert str(c_gpu["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in c_cpu["resources"].get("limits", {})
    tolerations = gpu["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations)
    assert "tolerations" not in cpu["spec"]["template"]["spec"]


# --- how the pieces point at each other ----------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_selectors_select_the_deployments_pods(rendered, target):
    docs = rendered[target]
    deploy = one(docs, "Deployment", "biva")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items()
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert svc["spec"]["selector"] == selector, svc["metadata"]["name"]
        named = {p["name"] for p in container(deploy)["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= named
    pdb = one(docs, "PodDisruptionBudget", "biva")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["minAvailable"] == 1
    hpa = one(docs, "HorizontalPodAutoscaler", "biva")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "biva"}
    # At one replica a minAvailable-1 PDB would block every node drain.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert hpa["spec"]["minReplicas"] <= deploy["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0


@needs_kubectl
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_routes_reach_the_right_service_ports(rendered, target):
    docs = rendered[target]
    deploy_ports = {p["name"]: p["containerPort"] for p in container(one(docs, "Deployment", "biva"))["ports"]}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    gateway = one(docs, "Gateway", "biva-gateway")
    listeners = {lst["name"]: lst for lst in gateway["spec"]["listeners"]}
    assert gateway["spec"]["gatewayClassName"]

    def backend(route_kind: str, container_port_name: str) -> dict:
        route = one(docs, route_kind)
        (parent,) = route["spec"]["parentRefs"]
        assert parent["name"] == "biva-gateway"
        assert {"kind": route_kind} in listeners[parent["sectionName"]]["allowedRoutes"]["kinds"]
        refs = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
        assert len(refs) == 1
        svc = services[refs[0]["name"]]
        (port,) = [p for p in svc["spec"]["ports"] if p["port"] == refs[0]["port"]]
        assert port["targetPort"] == container_port_name
        assert refs[0]["port"] == deploy_ports[container_port_name]
        return port

    assert backend("HTTPRoute", "http")["appProtocol"] == "http"
    assert backend("GRPCRoute", "grpc")["appProtocol"] == "kubernetes.io/h2c"  # HTTP/2 cleartext to the pod


@needs_kubectl
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_servicemonitor_scrapes_the_metrics_service(rendered, target):
    docs = rendered[target]
    sm = one(docs, "ServiceMonitor", "biva")
    wanted = sm["spec"]["selector"]["matchLabels"]
    matched = [d for d in docs if d["kind"] == "Service" and wanted.items() <= d["metadata"]["labels"].items()]
    assert [d["metadata"]["name"] for d in matched] == ["biva-metrics"]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["interval"] == "15s"
    (port,) = [p for p in matched[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["port"] == 8002 and port["targetPort"] == "metrics"


@needs_kubectl
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_hpa_metric_comes_from_the_adapter_rule_of_the_recording_rule(rendered, target):
    docs = rendered[target]
    hpa = one(docs, "HorizontalPodAutoscaler", "biva")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    adapter = yaml.safe_load(one(docs, "ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == "triton_queue_compute_ratio"
    series = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?", rule["seriesQuery"])
    records = [r["record"] for g in one(docs, "PrometheusRule", "biva")["spec"]["groups"] for r in g["rules"]]
    assert series and series.group(1) in records
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


@needs_kubectl
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_prometheusrule_equals_the_rule_file(rendered, target):
    assert one(rendered[target], "PrometheusRule", "biva")["spec"]["groups"] == rules_file_groups()


def test_recording_rule_is_per_pod_and_clamped():
    (group,) = rules_file_groups()
    (rule,) = group["rules"]
    assert rule["record"] == "triton:queue_compute:ratio"
    expr = " ".join(rule["expr"].split())
    assert expr == ("sum by (namespace, pod) (rate(nv_inference_queue_duration_us[1m])) / "
                    "clamp_min(sum by (namespace, pod) (rate(nv_inference_compute_infer_duration_us[1m])), 1)")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus; "
                    "`make data` does it)")
def test_promtool_unit_test_of_the_recording_rule():
    check = subprocess.run([PROMTOOL, "check", "rules", str(PROM / "rules.yml")], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    out = subprocess.run([PROMTOOL, "test", "rules", str(PROM / "rules_test.yml")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


# --- KServe ------------------------------------------------------------------------------------------------------

@needs_kubectl
def test_kserve_runtime_matches_the_deployment(rendered):
    docs = rendered["kserve"]
    runtime = one(docs, "ServingRuntime", "biva-tritonserver")
    isvc = one(docs, "InferenceService", "biva")
    deploy_c = container(one(rendered["cpu"], "Deployment", "biva"))
    (c,) = runtime["spec"]["containers"]
    assert c["name"] == "kserve-container"
    assert c["image"] == deploy_c["image"] and c["command"] == deploy_c["command"]
    # KServe mounts storageUri at /mnt/models; every other flag is the Deployment's.
    assert flag(c["args"], "model-repository") == "/mnt/models"
    strip = lambda args: [a for a in args if not a.startswith("--model-repository=")]
    assert strip(c["args"]) == strip(deploy_c["args"])
    deploy_ports = {p["name"]: p["containerPort"] for p in deploy_c["ports"]}
    assert [p["containerPort"] for p in c["ports"]] == [deploy_ports["http"], deploy_ports["grpc"]]
    assert [p["name"] for p in c["ports"]][1] == "h2c"  # the port name KServe gives gRPC
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(deploy_ports["metrics"])
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    assert [f["name"] for f in runtime["spec"]["supportedModelFormats"]] == ["triton"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["storageUri"] == "s3://biva-models/ood28"


# --- images --------------------------------------------------------------------------------------------------------

def test_dockerfiles_pin_torch_first_and_run_as_1000():
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", cpu, re.M)
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3$", gpu, re.M)
    for text, extra in ((cpu, ".[cpu]"), (gpu, ".[gpu]")):
        torch_at = text.index("--index-url https://download.pytorch.org/whl/cpu torch==2.13.0")
        assert torch_at < text.index(f"pip install '{extra}'")
        assert re.search(r"^USER 1000(:1000)?$", text, re.M)
    assert NVIDIA_TRITON in gpu
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "triton_models/*", ".git"} <= set(ignored)


def test_dockerfiles_copy_every_package_of_the_project():
    """`pip install .` in the image builds every package-dir of pyproject.toml: each must be in the context."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")
    dirs = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert dirs
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        copied = set(re.findall(r"^COPY (\S+) \1$", (DOCKER / name).read_text(), re.M))
        assert dirs <= copied, f"{name} misses {sorted(dirs - copied)}"
        ignored = (ROOT / ".dockerignore").read_text().split()
        assert not dirs & set(ignored)
