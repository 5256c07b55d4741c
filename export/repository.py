"""The Triton model repository: graph models (one per ONNX graph) and the front models of the API.

    triton_models/
      biva_sampler/  config.pbtxt  1/model.onnx  [1/model.py]     graph models: python backend running
      biva_encoder/  ...                                            ONNX Runtime, or native onnxruntime
      biva_scorer/   ...
      biva_sample/   config.pbtxt  1/model.py                      front models (python backend, BLS)
      biva_regenerate/ biva_encode/ biva_score/
      export_report.json

Every config.pbtxt is generated here from the specs (graphs.py for the graphs, FRONT_SPECS below for the
API), and parsed back into Triton's ModelConfig protobuf before anything is written.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .graphs import GraphSpec, TensorSpec

TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
PYTHON_DIR = Path(__file__).parent / "triton_python"

# The graph models each API (front) model calls through BLS (front_model.py's _call).
FRONT_GRAPHS = {"biva_sample": ("biva_sampler",), "biva_regenerate": ("biva_sampler",),
                "biva_encode": ("biva_encoder",), "biva_score": ("biva_scorer", "biva_encoder")}

# Default request caps (issue: one request must not exhaust memory). Documented in the README.
DEFAULT_CAPS = {"max_n": 1024, "max_images": 1024, "max_iw": 5000, "max_iw_rows": 262144, "max_temperature": 10.0}


@dataclass(frozen=True)
class FrontSpec:
    name: str
    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    optional: tuple[str, ...] = ()


def front_specs(image_shape: tuple[int, ...], D: int, G: int) -> dict[str, FrontSpec]:
    """The request API. Non-batched models: -1 is a free dimension (B images, n samples, nk values)."""
    f32 = lambda name, *dims: TensorSpec(name, "float32", tuple(dims))  # noqa: E731
    i64 = lambda name, *dims: TensorSpec(name, "int64", tuple(dims))  # noqa: E731
    img = (-1, *image_shape)
    seed_in, temp_in, seed_out = i64("seed", 1), f32("temperature", 1), i64("seed", 1)
    return {
        "biva_sample": FrontSpec("biva_sample", "sample", (i64("n", 1), seed_in, temp_in),
                                 (f32("images", *img), seed_out), ("seed", "temperature")),
        "biva_regenerate": FrontSpec("biva_regenerate", "regenerate", (f32("z", -1, D), i64("k", 1), seed_in, temp_in),
                                     (f32("images", *img), seed_out), ("seed", "temperature")),
        "biva_encode": FrontSpec("biva_encode", "encode", (f32("images", *img), seed_in),
                                 (f32("z", -1, D), f32("q_mu", -1, D), f32("q_log_std", -1, D), f32("kl", -1, G),
                                  seed_out), ("seed",)),
        "biva_score": FrontSpec("biva_score", "score", (f32("images", *img), i64("iw", 1), i64("ks", -1), seed_in),
                                (f32("elbo", -1), f32("iw_bound", -1), f32("l_gt_k", -1, -1), f32("kl", -1, G),
                                 seed_out), ("iw", "ks", "seed")),
    }


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


def graph_config(spec: GraphSpec, backend: str, max_batch: int, instances: int, threads: int,
                 preferred: tuple[int, ...], queue_delay_us: int) -> str:
    """config.pbtxt of a graph model: python backend (ONNX Runtime inside) or native onnxruntime."""
    head = f'name: "{spec.name}"\n'
    if backend == "python":
        head += 'backend: "python"\n'
        kind, extra = "KIND_CPU", _params({"onnx_file": "model.onnx", "intra_op_threads": str(threads)})
    else:
        head += 'platform: "onnxruntime_onnx"\n'
        kind = "KIND_GPU"
        extra = ("optimization { execution_accelerators { gpu_execution_accelerator [ { name: \"tensorrt\"\n"
                 "  parameters { key: \"precision_mode\" value: \"FP32\" }\n"
                 "  parameters { key: \"max_workspace_size_bytes\" value: \"1073741824\" } } ] } }\n")
    pref = ", ".join(str(p) for p in preferred if p <= max_batch)
    pref = f"preferred_batch_size: [ {pref} ] " if pref else ""
    return (head + f"max_batch_size: {max_batch}\n" + _tensor_block("input", spec.inputs)
            + _tensor_block("output", spec.outputs)
            + f"dynamic_batching {{ {pref}max_queue_delay_microseconds: {queue_delay_us} }}\n"
            + f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n" + extra)


def front_config(spec: FrontSpec, meta: dict, instances: int) -> str:
    return (f'name: "{spec.name}"\nbackend: "python"\nmax_batch_size: 0\n'
            + _tensor_block("input", spec.inputs, spec.optional) + _tensor_block("output", spec.outputs)
            + f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
            + _params({"role": spec.role, "biva_meta": json.dumps(meta, sort_keys=True)}))


def parse_config(text: str):
    """Parse a config.pbtxt into Triton's ModelConfig protobuf (raises on any error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def write_model_files(root: Path, configs: dict[str, str], onnx_files: dict[str, Path], backend: str) -> None:
    """Lay out one folder per model under `root` (a fresh directory)."""
    for name, text in configs.items():
        parse_config(text)
        version = root / name / "1"
        version.mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)
        if name in onnx_files:
            shutil.copyfile(onnx_files[name], version / "model.onnx")
            if backend == "python":
                shutil.copyfile(PYTHON_DIR / "graph_model.py", version / "model.py")
        else:
            shutil.copyfile(PYTHON_DIR / "front_model.py", version / "model.py")


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
