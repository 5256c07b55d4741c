"""The runtime loaders: the one ONNX Runtime session builder and AOTInductor package loader (validation, bench and
the python-backend graph models), and the check that a package fits this machine's processor. Copied beside every
python-backend model.py; onnxruntime and torch are imported only when a loader runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime session options beyond the model file."""

    threads: int = 0  # intra-op threads (0: all cores)
    level: str = "all"  # graph optimisation level (ORT_LEVELS)
    gpu_device: int | None = None  # the CUDA provider on this device, where onnxruntime-gpu has it
    saved_graph: str | None = None  # also write the optimised graph here
    spinning: bool | None = None  # idle intra-op threads busy-wait for work (None: ONNX Runtime's default, on)


def ort_session(path: str, options: OrtOptions = OrtOptions()):
    """The one ONNX Runtime session builder (validation, bench and the python-backend graph models): one inter-op
    thread and `options`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if options.threads:
        opts.intra_op_num_threads = options.threads
    if options.spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spinning else "0")
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[options.level])
    if options.saved_graph:
        opts.optimized_model_filepath = str(options.saved_graph)
    providers: list = ["CPUExecutionProvider"]
    if options.gpu_device is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": options.gpu_device}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), opts, providers=providers)


def cpu_info() -> tuple[str, set[str]]:
    """This machine's processor name and its instruction-set flags, from /proc/cpuinfo ("", {} elsewhere)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name, flags


def check_package_isa(model: str, isa: dict) -> None:
    """RuntimeError (one line, naming both processors) when this machine lacks an instruction set a model's
    AOTInductor package was compiled for (isa: PACKAGE_ISA_PARAMETER's value)."""
    name, flags = cpu_info()
    missing = sorted(set(isa.get("flags", ())) - flags)
    if missing:
        raise RuntimeError(f"{model}: its AOTInductor package was compiled on {isa.get('cpu') or 'another processor'} "
                           f"for {', '.join(isa['flags'])}; this machine's processor ({name or 'unknown'}) lacks "
                           f"{', '.join(missing)}: export the repository again on this machine (biva-export), or "
                           "with --runtime onnxruntime")


def ort_shrinking_run():
    """ONNX Runtime RunOptions that give the CPU arena's unused memory back at the end of the run."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


def aoti_runner(path: str, threads: int = 0):
    """The one AOTInductor package loader (export/aoti.py writes them): `threads` intra-op threads (0: torch's
    default); returns run(*arrays) -> outputs, numpy in the spec's input order, numpy out in its output order."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    package = torch._inductor.aoti_load_package(str(path))

    def run(*arrays):
        with torch.inference_mode():
            return [t.numpy() for t in package(*(torch.from_numpy(a) for a in arrays))]
    return run
