"""The compiled route: each graph as an AOTInductor package (torch.export with the same dynamic axes as the
ONNX graph, compiled ahead of time by inductor), served by the python backend instead of ONNX Runtime.

Why: inductor fuses BIVA's elementwise work (the ELU before every convolution, the gates, the residual adds)
into the loops around its convolutions, which ONNX Runtime's CPU provider cannot; from 8 rows it is the
faster runtime here (docs/speed.md). One package per graph holds every batch size (a dynamic batch axis, as
the ONNX graph), so a server compiles nothing; for models of small weights a second one is compiled for exactly
the 32 images of a full slice (routing.SLICE_PACKAGE_FILE), which inductor specialises: 0-10% faster per graph
in alternated calls (docs/speed.md). Packages are validated against PyTorch at the same tolerances as the ONNX graphs
(onnx_export.compare_with_torch) before anything is written.

A package is machine code for the exporting processor's instruction sets (`package_isa`, recorded in the graph
model's config, checked when the model loads: runtimes.check_package_isa). The packages compile in worker
processes beside the ONNX export, and land in a cache keyed by everything they are made from (the checkpoint's
hash, the graph, torch's version, the instruction sets, the model code), so exporting the same checkpoint again on
the same kind of machine reuses them (validated again), and another processor compiles its own.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch

from biva_core.checkpoint import sha256_file
from biva_core.contract import GraphSpec
from biva_core.runtimes import aoti_runner
from biva_core.model import Biva

from .graphs import GRAPH_MODULES
from .onnx_export import GraphReport, compare_with_torch, dynamic_axes, traced_inputs


class _Plain(torch.nn.Module):
    """A graph module returning a plain tuple (in the spec's output order): packages hold no named tuples."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        self.inner = graph  # not "graph": torch.fx keeps its own .graph on the exported module

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.inner(*inputs))


def compile_package(spec: GraphSpec, model: Biva, path: Path, batch: int | None = None) -> None:
    """torch.export of the graph and AOTInductor's package at `path` (.pt2): every axis of the ONNX graph dynamic,
    or with `batch` the batch axis fixed at that many images (the free axes still dynamic)."""
    module = _Plain(GRAPH_MODULES[spec.name](model).eval()).eval()
    inputs = traced_inputs(spec, model)
    if batch is not None:
        inputs = tuple(t[:1].expand(batch, *t.shape[1:]).contiguous() for t in inputs)
    with torch.no_grad():
        # Dim.DYNAMIC: torch.export works out the axes' relations and ranges itself (named ranges trip over guards
        # it cannot simplify on the scorer's sample axis); the package is then checked at 1..33 rows, S 1..5, J 0..2
        shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in dynamic_axes(t) if batch is None or axis}
                       for t in spec.inputs)
        program = torch.export.export(module, inputs, dynamic_shapes=(shapes,))
        # the fused loops' thread count read at run time (torch.set_num_threads of whoever loads the package), not
        # the compiling worker's one thread: compiled with it fixed, every inductor loop ran serial for good, and a
        # 2-thread caller got 0.83x torch.compile on the scorer at 64 rows (1.00x with this; docs/speed.md)
        with torch._inductor.config.patch({"cpp.dynamic_threads": True}):
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def validate_package(spec: GraphSpec, model: Biva, path: Path, atol_scale: float = 1.0, batch: int | None = None
                     ) -> GraphReport:
    """The package against PyTorch eager on fresh inputs, as validate_graph does for the ONNX graph (a package for
    `batch` images at that batch, with every size of the free axes validate_graph uses)."""
    run = aoti_runner(str(path))
    rep = compare_with_torch(spec, model, lambda feeds: run(*(feeds[n] for n in spec.input_names)),
                             batches=(1, 7, 33) if batch is None else (batch,) * 3, atol_scale=atol_scale)
    rep.runtime = "AOTI" if batch is None else f"AOTI[{batch}]"
    return rep


# The slice package is a second copy of the weights in every graph instance: built only for models whose weights
# are small (the binary models' few MB), not for the natural-image models' gigabyte of graphs
SLICE_PACKAGE_MAX_PARAMS = 16_000_000


def wants_slice_package(model: Biva) -> bool:
    return sum(p.numel() for p in model.parameters()) <= SLICE_PACKAGE_MAX_PARAMS


# inductor's -m flags -> the names /proc/cpuinfo gives the same instruction sets
_CPUINFO = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
            "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8", "amx-fp16": "amx_fp16"}
SOURCES = ("biva_core/model.py", "biva_core/layers.py", "biva_core/distributions.py", "biva_core/objectives.py",
           "export/graphs.py", "export/aoti.py")  # what a package is compiled from, besides the weights


def package_isa() -> dict:
    """The processor a package compiled here is for: its name and the instruction sets inductor builds with."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from biva_core.runtimes import cpu_info

    flags = [f[2:] for f in pick_vec_isa().build_arch_flags().split() if f.startswith("-m")]
    return {"cpu": cpu_info()[0], "flags": sorted({_CPUINFO.get(f, f.replace("-", "_")) for f in flags})}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "biva-serving" / "aoti"


def cache_key(ckpt_sha: str, graph: str, isa: dict, batch: int | None = None) -> str:
    root = Path(__file__).resolve().parent.parent
    code = hashlib.sha256(b"".join((root / s).read_bytes() for s in SOURCES)).hexdigest()
    parts = {"checkpoint": ckpt_sha, "graph": graph, "torch": torch.__version__, "isa": isa["flags"], "code": code}
    if batch is not None:
        parts["batch"] = batch
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _compile_worker(ckpt: str, graph: str, path: str, batch: int | None) -> float:
    """In a worker process: the package of one graph of the checkpoint at `path`; its seconds."""
    from biva_core.checkpoint import load_model

    from .graphs import graph_specs, inference_copy

    t = time.perf_counter()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecation notes, not the user's
    torch.set_num_threads(1)
    model, _ = load_model(ckpt)
    plain = inference_copy(model)
    compile_package(graph_specs(plain)[graph], plain, Path(path), batch)
    return time.perf_counter() - t


class PackageBuilds:
    """The packages of a checkpoint's graphs, from the cache or compiled in worker processes (started at once, so
    they run while the caller exports the ONNX graphs): for each graph the package of every batch size, and with
    `slice_batch` the one for exactly that many images. `result(graph, batch)` waits for one: (path, seconds,
    cached)."""

    def __init__(self, ckpt: Path, graphs: list[str], work: Path, slice_batch: int | None = None):
        self.isa, sha = package_isa(), sha256_file(ckpt)
        self.cache = cache_dir()
        builds = [(g, None) for g in reversed(graphs)] + [(g, slice_batch) for g in reversed(graphs) if slice_batch]
        self.keys = {(g, b): cache_key(sha, g, self.isa, b) for g, b in builds}
        self.work, self.pool, self.jobs, self.slice_batch = work, None, {}, slice_batch
        # the largest first (the scorer's compile took 48 s, the encoder's 32, the sampler's 20 for ood28), every
        # graph's general package before the slice packages: with two workers the whole waits for the scorer's two
        todo = [k for k in builds if not (self.cache / f"{self.keys[k]}.pt2").is_file()]
        if todo:
            workers = max(1, min(len(todo), len(os.sched_getaffinity(0))))
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            self.jobs: dict[tuple, Future] = {(g, b): self.pool.submit(_compile_worker, str(ckpt), g,
                                                                       str(self._built(g, b)), b) for g, b in todo}

    def _built(self, graph: str, batch: int | None) -> Path:
        return self.work / (f"{graph}.pt2" if batch is None else f"{graph}.b{batch}.pt2")

    def result(self, graph: str, batch: int | None = None) -> tuple[Path, float, bool]:
        cached = self.cache / f"{self.keys[(graph, batch)]}.pt2"
        if (graph, batch) not in self.jobs:
            return cached, 0.0, True
        seconds = self.jobs[(graph, batch)].result()
        self._keep(self._built(graph, batch), cached)
        return self._built(graph, batch), seconds, False

    def _keep(self, built: Path, cached: Path) -> None:
        """Into the cache, whole or not at all (a temporary file beside it, then a rename); a cache that cannot be
        written is skipped."""
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
            os.close(fd)
            shutil.copyfile(built, tmp)
            os.replace(tmp, cached)
        except OSError:
            pass

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
