"""The Triton model repository: graph models (one per ONNX graph) and the front models of the API.

    triton_models/
      biva_sampler/  config.pbtxt  1/model.onnx  [1/model.py]     graph models: python backend running
      biva_encoder/  ...                                            ONNX Runtime, or native onnxruntime
      biva_scorer/   ...
      biva_sample/   config.pbtxt  1/model.py                      front models (python backend, BLS)
      biva_regenerate/ biva_encode/ biva_score/
      export_report.json

Every config.pbtxt is generated here from the contract's specs (contract.py: graph_specs, front_specs) and
parsed back into Triton's ModelConfig protobuf before anything is written. Beside every python-backend
model.py goes a copy of contract.py (as biva_contract.py), so the server imports the same contract.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .contract import (CONTRACT_COPY, GRAPH_INSTANCES_PARAMETER, META_PARAMETER, ONNX_FILE_PARAMETER, PACKAGE_FILE,
                       REPORT, ROLE_PARAMETER, RUNTIME_PARAMETER, SPINNING_PARAMETER, THREADS_PARAMETER, FrontSpec,
                       GraphSpec, ModelMeta, TensorSpec)

TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
# the serving step's python-backend model code, found without importing it (biva_serving is a later step)
PYTHON_DIR = Path(importlib.util.find_spec("biva_serving").submodule_search_locations[0]) / "triton_python"
CONTRACT_FILE = Path(__file__).parent / "contract.py"


def _tensor_block(kind: str, tensors: tuple[TensorSpec, ...], optional: tuple[str, ...] = ()) -> str:
    items = []
    for t in tensors:
        opt = " optional: true" if t.name in optional else ""
        dims = ", ".join(str(d) for d in t.dims)
        items.append(f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} dims: [ {dims} ]{opt} }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _params(params: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: \"{k}\" value: {{ string_value: {json.dumps(v)} }} }}\n"
                   for k, v in params.items())


@dataclass(frozen=True)
class ServingConfig:
    """How the graph models are served (biva-export's options)."""

    backend: str = "python"  # "python" (ONNX Runtime in the python backend) or "onnxruntime" (native, GPU)
    max_batch: int = 1024  # rows per graph call: max_batch_size of the graph models
    # instances per graph model. Two, not one with all threads: Triton 2.51's dynamic batcher with a queue policy
    # (graph_queue below) misses the wake-up when a lone instance frees up, so requests that arrive then wait
    # its 500 ms timeout; with two the other instance takes them (README, Speed: batching)
    instances: int = 2
    front_instances: int = 2  # instances per front (API) model
    threads: int = 0  # ONNX Runtime intra-op threads per python-backend graph instance (0: cores / instances)
    runtime: str = "onnxruntime"  # what runs the python backend's graphs: ONNX Runtime, or "aoti" (export/aoti.py)
    spinning: bool = False  # idle ONNX Runtime intra-op threads busy-wait for work (ORT's default; no faster
    #                         served, measured: README, Speed)
    preferred: tuple[int, ...] = ()  # dynamic batcher preferred batch sizes (none: batch what has arrived)
    # dynamic batcher: longest a request waits for others to join its batch. 0: an idle instance takes what is
    # queued at once (under load the queue still forms batches: 16 clients 0.93-0.97 of the ceiling vs 0.94 with
    # 500 us); a delay merges the calls a front model sends to both instances at once into one instance's batch
    queue_delay_us: int = 0
    front_queue: int = 8  # requests waiting per front model beyond those running; more are refused as busy
    front_queue_timeout_us: int = 1_000_000  # longest a front request waits for an instance, then "busy"
    graph_queue: int = 256  # requests waiting per graph model (front models' slices and direct callers)


def graph_config(spec: GraphSpec, sc: ServingConfig, meta: ModelMeta | None = None) -> str:
    """config.pbtxt of a graph model: python backend (ONNX Runtime inside) or native onnxruntime."""
    backend, max_batch, instances = sc.backend, sc.max_batch, sc.instances
    head = f'name: "{spec.name}"\n'
    if backend == "python":
        head += 'backend: "python"\n'
        params = {ONNX_FILE_PARAMETER: "model.onnx", THREADS_PARAMETER: str(sc.threads),
                  SPINNING_PARAMETER: "1" if sc.spinning else "0", RUNTIME_PARAMETER: sc.runtime}
        if meta is not None:
            params[META_PARAMETER] = meta.to_json()
        kind, extra = "KIND_CPU", _params(params)
    else:
        head += 'platform: "onnxruntime_onnx"\n'
        kind = "KIND_GPU"
        extra = ("optimization { execution_accelerators { gpu_execution_accelerator [ { name: \"tensorrt\"\n"
                 "  parameters { key: \"precision_mode\" value: \"FP32\" }\n"
                 "  parameters { key: \"max_workspace_size_bytes\" value: \"1073741824\" } } ] } }\n")
    pref = ", ".join(str(p) for p in sc.preferred if p <= max_batch)
    pref = f"preferred_batch_size: [ {pref} ] " if pref else ""
    return (head + f"max_batch_size: {max_batch}\n" + _tensor_block("input", spec.inputs)
            + _tensor_block("output", spec.outputs)
            + f"dynamic_batching {{ {pref}max_queue_delay_microseconds: {sc.queue_delay_us}\n"
            + f"  default_queue_policy {{ max_queue_size: {sc.graph_queue} timeout_action: REJECT }} }}\n"
            + f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n" + extra)


def front_config(spec: FrontSpec, meta: ModelMeta, sc: ServingConfig) -> str:
    """A front model: no batching, but a bounded queue with a bounded wait (back-pressure: Triton answers
    429 / UNAVAILABLE "Exceeds maximum queue size" or "Request timeout expired" instead of queueing)."""
    policy = (f"default_queue_policy {{ max_queue_size: {sc.front_queue} timeout_action: REJECT "
              f"default_timeout_microseconds: {sc.front_queue_timeout_us} }}")
    return (f'name: "{spec.name}"\nbackend: "python"\nmax_batch_size: 0\n'
            + _tensor_block("input", spec.inputs, spec.optional) + _tensor_block("output", spec.outputs)
            + f"dynamic_batching {{ {policy} }}\n"
            + f"instance_group [ {{ count: {sc.front_instances} kind: KIND_CPU }} ]\n"
            + _params({ROLE_PARAMETER: spec.role, META_PARAMETER: meta.to_json(),
                       GRAPH_INSTANCES_PARAMETER: str(sc.instances)}))


def parse_config(text: str):
    """Parse a config.pbtxt into Triton's ModelConfig protobuf (raises on any error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def write_model_files(root: Path, configs: dict[str, str], onnx_files: dict[str, Path], backend: str,
                      packages: dict[str, Path] | None = None) -> None:
    """Lay out one folder per model under `root` (a fresh directory); `packages`: the graphs' AOTInductor
    packages, beside their ONNX files, for the aoti runtime."""
    for name, text in configs.items():
        parse_config(text)
        version = root / name / "1"
        version.mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)
        source = PYTHON_DIR / ("graph_model.py" if name in onnx_files else "front_model.py")
        if name in onnx_files:
            shutil.copyfile(onnx_files[name], version / "model.onnx")
        if packages and name in packages:
            shutil.copyfile(packages[name], version / PACKAGE_FILE)
        if name not in onnx_files or backend == "python":
            shutil.copyfile(source, version / "model.py")
            shutil.copyfile(CONTRACT_FILE, version / CONTRACT_COPY)  # the server imports the same contract


def generated_copies(root: Path) -> dict[Path, Path]:
    """Every python file biva-export copied into repository `root` -> the source file it must equal."""
    out = {}
    for model_py in sorted(root.glob("*/1/model.py")):
        graph = ONNX_FILE_PARAMETER in (model_py.parent.parent / "config.pbtxt").read_text()
        out[model_py] = PYTHON_DIR / ("graph_model.py" if graph else "front_model.py")
        out[model_py.parent / CONTRACT_COPY] = CONTRACT_FILE
    return out


def read_meta(repo: Path) -> ModelMeta:
    """The model metadata of a repository written by biva-export (from its report)."""
    return ModelMeta.from_json(json.dumps(json.loads((repo / REPORT).read_text())["meta"]))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(out: Path) -> Path:
    """A fresh directory beside `out` (same file system, so the final swap is a rename).

    Its name carries our pid; staging left by an export that was killed (pid gone) is removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        pid = stale.name.rsplit("-", 2)[-2] if stale.name.count("-") >= 2 else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))


def swap_into_place(staged: Path, out: Path) -> None:
    """Replace `out` with `staged` in one step: readers see the old or the new repository, never a mix."""
    if out.exists() and _exchange(staged, out):
        shutil.rmtree(staged)  # staged now holds the old repository
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(staged, out)
    if old is not None:
        shutil.rmtree(old)
