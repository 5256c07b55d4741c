"""How a graph model runs one call: its rows, its slices for the AOTInductor package, and which runtime serves
each call size (the served route). The python-backend graph models, the export's report and the bench share it;
copied beside every python-backend model.py. Numpy and the contract only.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .contract import T

# A graph model's config.pbtxt parameters (python backend): its ONNX file, intra-op threads, "1"/"0" spinning
ONNX_FILE_PARAMETER, THREADS_PARAMETER, SPINNING_PARAMETER = "onnx_file", "intra_op_threads", "intra_op_spinning"
# and the runtime that runs it: ONNX Runtime on model.onnx, or the AOTInductor package PACKAGE_FILE (export/aoti.py)
RUNTIME_PARAMETER, PACKAGE_FILE = "runtime", "model.pt2"
# beside it, the same graph compiled for exactly AOTI_SLICE_ROWS images (the batch axis static, the scorer's
# samples and ks still free): a full slice runs on it, 0-10% faster than on the package that holds every batch size
# (docs/speed.md: the sampler gains most, the scorer nothing measurable); the other slices run on PACKAGE_FILE
SLICE_PACKAGE_FILE = "model_slice.pt2"
AOTI_THREADS_PARAMETER = "aoti_threads"  # intra-op threads of a graph model's package (0: as ONNX Runtime's)
PACKAGE_ISA_PARAMETER = "aoti_isa"  # the CPU the package was compiled on: {"cpu": name, "flags": [cpuinfo flags]}

# the aoti runtime keeps ONNX Runtime for calls of fewer rows, where it leads (docs/speed.md: the row threshold,
# measured on an AMD EPYC and an Intel Xeon with 2 threads)
AOTI_MIN_ROWS = 8
# and for every call of an instance with fewer package threads: on one thread ONNX Runtime led the package at every
# row count (package / ONNX Runtime 0.73-1.01 over 1-64 rows, and 18 / 17 / 5% faster than the slice package on
# 32-row sampler / encoder / scorer calls on an AMD EPYC; docs/speed.md: the row threshold). Two instances of one
# thread each are the default layout on a 2-core machine; more cores per instance serve the packages.
AOTI_MIN_THREADS = 2
# A graph model runs a call of more than ARENA_KEEP_ROWS rows (a direct caller's, or calls the batcher merged) with
# ONNX Runtime's arena shrinkage, so its memory goes back after it (docs/serving.md: memory); the front models' calls
# (scoring.CALL_ROWS, IW_CALL_ROWS) stay within it, so the arena grows only to what their largest call needs
ARENA_KEEP_ROWS = 64


def call_rows(feeds: dict[str, np.ndarray]) -> int:
    """Rows of one graph call: images x draws for the scorer (noise (B, S, N)), else its batch."""
    noise = feeds.get(T.noise)
    if noise is not None and noise.ndim == 3:
        return int(noise.shape[0] * noise.shape[1])
    return int(len(next(iter(feeds.values()))))


# The package runs a call of more rows in slices of at most AOTI_SLICE_ROWS rows: on the project machine (Xeon, 2
# threads) its 64-row calls ran at 0.75-0.87 of two 32-row calls, as small calls keep the activations in the caches
AOTI_SLICE_ROWS = 32


def row_slices(feeds: dict[str, np.ndarray], rows: int = AOTI_SLICE_ROWS) -> list[dict[str, np.ndarray]]:
    """A graph call's inputs in slices of whole images holding at most `rows` rows each (call_rows; at least one
    image a slice)."""
    per_image = max(1, call_rows(feeds) // max(1, len(next(iter(feeds.values())))))
    step = max(1, rows // per_image)
    n = len(next(iter(feeds.values())))
    return [{k: v[s:s + step] for k, v in feeds.items()} for s in range(0, n, step)]


Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def run_in_slices(run: Run, feeds: dict[str, np.ndarray], rows: int = AOTI_SLICE_ROWS, full: Run | None = None
                  ) -> list[np.ndarray]:
    """run(feeds) over row_slices, the outputs concatenated along the batch; a slice of exactly `rows` images goes
    to `full` instead where given (the package compiled for that batch: SLICE_PACKAGE_FILE)."""
    pick = lambda f: full if full is not None and len(next(iter(f.values()))) == rows else run  # noqa: E731
    parts = [pick(f)(f) for f in row_slices(feeds, rows)]
    return parts[0] if len(parts) == 1 else [np.concatenate(p, axis=0) for p in zip(*parts)]


def served_ranges(runtime: str, max_batch: int, slice_package: bool) -> list[dict]:
    """What a graph model runs each call size on (for the export report): row ranges -> runtime and file, and the
    package threads per instance each range needs (served_runtime)."""
    onnx = dict(rows=f"1-{max_batch}", runtime="onnxruntime", file="model.onnx")
    if runtime != "aoti":
        return [onnx]
    few, many = f"below {AOTI_MIN_THREADS}", f"{AOTI_MIN_THREADS} or more"  # package threads per instance
    out = [{**onnx, "threads": few},
           dict(rows=f"1-{AOTI_MIN_ROWS - 1}", threads=many, runtime="onnxruntime", file="model.onnx"),
           dict(rows=f"{AOTI_MIN_ROWS}-{max_batch}", threads=many, runtime="aoti", file=PACKAGE_FILE,
                slices_of_rows=AOTI_SLICE_ROWS)]
    if slice_package:
        out[2]["full_slices"] = {"images": AOTI_SLICE_ROWS, "file": SLICE_PACKAGE_FILE}
    return out


def served_runtime(runtime: str, rows: int, threads: int) -> str:
    """What a graph model whose package runs on `threads` threads runs a call of `rows` rows on: with the aoti
    runtime, the package from AOTI_MIN_ROWS rows and AOTI_MIN_THREADS threads; ONNX Runtime otherwise."""
    return "aoti" if runtime == "aoti" and rows >= AOTI_MIN_ROWS and threads >= AOTI_MIN_THREADS else "onnxruntime"
