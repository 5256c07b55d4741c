"""The Triton model repository: graph models (one per ONNX graph) and the front models of the API.

    triton_models/
      biva_graph_sampler/  config.pbtxt  1/model.onnx  [1/model.pt2]  [1/model.py]   graph models: ONNX Runtime
      biva_graph_encoder/  ...                                                     (or the AOTInductor package)
      biva_graph_scorer/   ...                                                     in the python backend, or
                                                                                   native onnxruntime
      biva_sample/  config.pbtxt  1/model.py                                       front models (python backend,
      biva_regenerate/ biva_encode/ biva_score/ [biva_detect/ + 1/detector.json]   BLS)
      export_report.json

Every config.pbtxt is generated here from the contract's specs (biva_core.contract: graph_specs, front_specs) and
parsed back into Triton's ModelConfig protobuf before anything is written. Beside every python-backend model.py
go copies of the biva_core modules the model code imports (SERVED_CORE, torch-free), so the server imports them
under the names the rest of the project does (`biva_core.contract`, `biva_core.scoring`, ...); model.py puts its
folder first on sys.path, so these copies win over an installed biva_core. The model code itself is
export/triton_python/.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path

from biva_core.contract import (DETECTOR_PARAMETER, DTYPES, GRAPH_INSTANCES_PARAMETER, META_PARAMETER, ROLE_PARAMETER,
                                FrontSpec, GraphSpec, ModelMeta, TensorSpec)
from biva_core.routing import (AOTI_THREADS_PARAMETER, ONNX_FILE_PARAMETER, PACKAGE_ISA_PARAMETER, RUNTIME_PARAMETER,
                               SPINNING_PARAMETER, THREADS_PARAMETER)

from .serving_config import ServingConfig

PYTHON_DIR = Path(__file__).parent / "triton_python"  # the python-backend model code this step writes
CORE_DIR = Path(__file__).resolve().parent.parent / "biva_core"
# what the served model code (triton_python/) imports of biva_core, transitively, and nothing else (a test checks it)
SERVED_CORE = ("__init__.py", "contract.py", "inflight.py", "routing.py", "runtimes.py", "scoring.py", "stats.py")


def _tensor_block(kind: str, tensors: tuple[TensorSpec, ...], optional: tuple[str, ...] = ()) -> str:
    items = []
    for t in tensors:
        opt = " optional: true" if t.name in optional else ""
        dims = ", ".join(str(d) for d in t.dims)
        items.append(f'  {{ name: "{t.name}" data_type: {DTYPES[t.dtype]} dims: [ {dims} ]{opt} }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _params(params: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: \"{k}\" value: {{ string_value: {json.dumps(v)} }} }}\n"
                   for k, v in params.items())


def graph_config(spec: GraphSpec, sc: ServingConfig, meta: ModelMeta | None = None, isa: dict | None = None) -> str:
    """config.pbtxt of a graph model: python backend (ONNX Runtime inside, or its AOTInductor package compiled for
    `isa`) or native onnxruntime."""
    backend, max_batch, instances = sc.backend, sc.max_batch, sc.instances
    head = f'name: "{spec.name}"\n'
    if backend == "python":
        head += 'backend: "python"\n'
        params = {ONNX_FILE_PARAMETER: "model.onnx", THREADS_PARAMETER: str(sc.threads),
                  SPINNING_PARAMETER: "1" if sc.spinning else "0", RUNTIME_PARAMETER: sc.runtime}
        if meta is not None:
            params[META_PARAMETER] = meta.to_json()
        if sc.runtime == "aoti" and isa is not None:
            params[PACKAGE_ISA_PARAMETER] = json.dumps(isa, sort_keys=True)
            params[AOTI_THREADS_PARAMETER] = str(sc.aoti_threads)
        kind, extra = "KIND_CPU", _params(params)
    else:
        head += 'platform: "onnxruntime_onnx"\n'
        kind = "KIND_GPU"
        extra = ("optimization { execution_accelerators { gpu_execution_accelerator [ { name: \"tensorrt\"\n"
                 "  parameters { key: \"precision_mode\" value: \"FP32\" }\n"
                 "  parameters { key: \"max_workspace_size_bytes\" value: \"1073741824\" } } ] } }\n")
    return (head + f"max_batch_size: {max_batch}\n" + _tensor_block("input", spec.inputs)
            + _tensor_block("output", spec.outputs) + _batching(sc)
            + f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n" + extra)


def _batching(sc: ServingConfig) -> str:
    """A graph model's dynamic batcher (none with sc.dynamic_batching False: one call per execution)."""
    if not sc.dynamic_batching:
        return ""
    pref = ", ".join(str(p) for p in sc.preferred if p <= sc.max_batch)
    pref = f"preferred_batch_size: [ {pref} ] " if pref else ""
    return (f"dynamic_batching {{ {pref}max_queue_delay_microseconds: {sc.queue_delay_us}\n"
            f"  default_queue_policy {{ max_queue_size: {sc.graph_queue} timeout_action: REJECT }} }}\n")


def front_config(spec: FrontSpec, meta: ModelMeta, sc: ServingConfig, detector: dict | None = None) -> str:
    """A front model: no batching, but a bounded queue with a bounded wait (back-pressure: Triton answers
    UNAVAILABLE "Exceeds maximum queue size" or "Request timeout expired" instead of queueing, which the HTTP
    front turns into 429). `detector`: biva_detect's summary (stats.Detector.summary)."""
    policy = (f"default_queue_policy {{ max_queue_size: {sc.front_queue} timeout_action: REJECT "
              f"default_timeout_microseconds: {sc.front_queue_timeout_us} }}")
    params = {ROLE_PARAMETER: spec.role, META_PARAMETER: meta.to_json(), GRAPH_INSTANCES_PARAMETER: str(sc.instances)}
    if detector is not None:
        params[DETECTOR_PARAMETER] = json.dumps(detector, sort_keys=True)
    return (f'name: "{spec.name}"\nbackend: "python"\nmax_batch_size: 0\n'
            + _tensor_block("input", spec.inputs, spec.optional) + _tensor_block("output", spec.outputs)
            + f"dynamic_batching {{ {policy} }}\n"
            + f"instance_group [ {{ count: {sc.front_instances} kind: KIND_CPU }} ]\n" + _params(params))


def parse_config(text: str):
    """Parse a config.pbtxt into Triton's ModelConfig protobuf (raises on any error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _served_code(version: Path, graph: bool) -> None:
    """model.py and the biva_core modules it imports, into a model's version folder."""
    shutil.copyfile(PYTHON_DIR / ("graph_model.py" if graph else "front_model.py"), version / "model.py")
    (version / "biva_core").mkdir()
    for name in SERVED_CORE:
        shutil.copyfile(CORE_DIR / name, version / "biva_core" / name)


def write_model_files(root: Path, configs: dict[str, str], graph_files: dict[str, dict[str, Path]], backend: str,
                      extra_files: dict[str, dict[str, Path]] | None = None) -> None:
    """Lay out one folder per model under `root` (a fresh directory). `graph_files`: graph model -> its files by
    name in the version folder (model.onnx, and with the aoti runtime model.pt2); `extra_files`: the same for
    front models (biva_detect's detector.json)."""
    for name, text in configs.items():
        parse_config(text)
        version = root / name / "1"
        version.mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)
        for file_name, src in {**graph_files.get(name, {}), **(extra_files or {}).get(name, {})}.items():
            shutil.copyfile(src, version / file_name)
        if name not in graph_files or backend == "python":
            _served_code(version, graph=name in graph_files)


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


# The repository folder's own notes, which are not the export's: git keeps triton_models/README.md (what the export
# writes there and how to regenerate it), so a fresh clone's folder holds it alone, and every export carries it over
KEPT_FILES = ("README.md",)


def written_by_others(out: Path, report: str) -> bool:
    """`out` holds something besides its KEPT_FILES and was not written by biva-export (no `report` in it)."""
    return out.exists() and not (out / report).exists() and any(p.name not in KEPT_FILES for p in out.iterdir())


def swap_into_place(staged: Path, out: Path) -> None:
    """Replace `out` with `staged` in one step: readers see the old or the new repository, never a mix; the old
    one's KEPT_FILES go into the new one first."""
    for name in KEPT_FILES:
        if (out / name).is_file() and not (staged / name).exists():
            shutil.copy2(out / name, staged / name)
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
