"""The export pipeline behind `biva-export`, driven by one frozen `ExportConfig`.

Steps: load the checkpoint -> fold weight norm -> export sampler, encoder, scorer (dynamic batch) ->
onnx.checker(full_check) -> ONNX Runtime vs PyTorch on fresh random inputs -> write the repository in
a staging folder -> swap it into place. Nothing is replaced unless every graph passes validation.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from biva_core.contract import DEFAULT_ESTIMATOR, DETECT, DETECTOR_FILE, REPORT, Caps, ModelMeta
from biva_core.routing import (AOTI_MIN_ROWS, AOTI_MIN_THREADS, AOTI_SLICE_ROWS, PACKAGE_FILE, SLICE_PACKAGE_FILE,
                               served_ranges)

from biva_core.checkpoint import binarization, sha256_file

from .repository import front_config, graph_config, staging_dir, swap_into_place, write_model_files, written_by_others
from .serving_config import ServingConfig, package_threads


class ExportError(RuntimeError):
    """Export or validation failed; the message says which graph and by how much."""


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18  # ONNX opset
    exporter: str = "torchscript"  # torch.onnx exporter: "torchscript" (tracing, fast) or "dynamo"
    elu: str = "auto"  # ELU form (graph_passes): "decomposed", "native", or "auto" (native on the GPU backend)
    validate: bool = True  # check every graph against PyTorch before writing anything
    atol_scale: float = 1.0  # multiplies every validation tolerance; 0 demands exact equality
    force: bool = False  # replace an output folder that biva-export did not write
    quiet: bool = True  # hide the ONNX exporter's own output
    caps: Caps = field(default_factory=Caps)  # request caps written into every served model's metadata
    serving: ServingConfig = field(default_factory=ServingConfig)  # how the graph and front models are served
    # the fitted OOD detector served as biva_detect (`biva-client ood fit` writes one): a file, None for none, or
    # "auto": the checkpoint's own, CKPT with .detector.json for .pt, where it exists
    detector: Path | str | None = "auto"
    # with the aoti runtime, also a package per graph for exactly AOTI_SLICE_ROWS images (models of small weights:
    # aoti.wants_slice_package), which full slices run on
    slice_packages: bool = True
    # package threads per graph instance on the machine the repository will serve on (0: the layout on this machine,
    # its usable cores / the instances, or the serving config's fixed threads). The aoti runtime's packages are
    # compiled only when that is AOTI_MIN_THREADS or more: instances of fewer threads serve ONNX Runtime at every size
    target_threads: int = 0


def usable_cores() -> int:
    """The cores this process may run on: what a graph instance served here shares out (graph_model.py)."""
    return len(os.sched_getaffinity(0))


def package_plan(cfg: ExportConfig, cores: int | None = None) -> tuple[bool, int, str]:
    """Whether the export compiles the aoti runtime's packages, the package threads per instance it plans for, and
    why, in one line (the export's log and report). Raises ExportError when --target-threads contradicts the
    threads the serving config fixes on every machine."""
    sc = cfg.serving
    fixed = sc.aoti_threads or sc.threads
    if sc.runtime != "aoti":
        return False, 0, f"none: --runtime {sc.runtime} serves ONNX Runtime alone"
    if fixed and cfg.target_threads and cfg.target_threads != fixed:
        raise ExportError(f"--target-threads {cfg.target_threads} contradicts the {fixed} threads per graph instance "
                          "the serving config fixes on every machine (--threads); drop one of them")
    if fixed:
        threads, where = fixed, "fixed by the serving config: --threads"
    elif cfg.target_threads:
        threads, where = cfg.target_threads, "--target-threads"
    else:
        cores = cores or usable_cores()
        threads, where = package_threads(sc, cores), f"{cores} cores / {sc.instances} instances here"
    if threads < AOTI_MIN_THREADS:
        return False, threads, (f"none: instances run {threads} package thread{'s' * (threads != 1)} ({where}), "
                                f"fewer than the {AOTI_MIN_THREADS} the packages need, so ONNX Runtime serves every "
                                f"size; for instances of {AOTI_MIN_THREADS} or more threads: biva-export "
                                "--target-threads N")
    return True, threads, (f"compiled for instances of {threads} package threads ({where}): the packages serve from "
                           f"{AOTI_MIN_ROWS} rows")


def elu_form(cfg: ExportConfig) -> str:
    """The ELU form written: the decomposed one for ONNX Runtime's CPU provider (the python backend), the
    single Elu node for the native GPU backend, where TensorRT and the CUDA provider fuse or run it fast."""
    if cfg.elu == "auto":
        return "native" if cfg.serving.backend == "onnxruntime" else "decomposed"
    return cfg.elu


@contextlib.contextmanager
def _quiet_exporter(enabled: bool):
    """torch.onnx's dynamo exporter prints pages of progress; keep them out of the user's terminal."""
    if not enabled:
        yield
        return
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def _report_head(ckpt: Path, cfg: ExportConfig, source: str | None) -> dict:
    import onnx
    import torch
    try:
        import onnxruntime
    except ImportError:
        raise SystemExit("biva-export: ONNX Runtime is not installed; expected one of the extras: "
                         "pip install 'biva-serving[cpu]' (or '[gpu]' on a CUDA machine)") from None

    return {"checkpoint": source or str(ckpt),
            "opset": cfg.opset,
            "exporter": cfg.exporter, "elu": elu_form(cfg), "serving": asdict(cfg.serving),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "validated": cfg.validate, "graphs": {}}


def _export_and_validate(model, plain, specs: dict, tmp: Path, cfg: ExportConfig, log, out: Path, builds=None
                         ) -> tuple[dict, dict]:
    """Each graph exported into `tmp` and validated; returns (name -> {file name in the version folder: path},
    name -> report entry): the ONNX graph, and with the aoti runtime its package (from `builds`, aoti.PackageBuilds,
    validated too)."""
    from .onnx_export import export_graph, validate_graph

    files, entries = {}, {}
    for name, spec in specs.items():
        path = tmp / f"{name}.onnx"
        log(f"exporting {name} ...")
        with _quiet_exporter(cfg.quiet):
            export_graph(spec, plain, path, cfg.opset, cfg.exporter, elu_form(cfg))
        files[name] = {"model.onnx": path}
        entry = {"bytes": path.stat().st_size, "inputs": spec.input_names, "outputs": spec.output_names}
        if cfg.validate:
            entry.update(_checked(validate_graph(spec, model, path, atol_scale=cfg.atol_scale), log, out))
        if builds is not None:
            files[name][PACKAGE_FILE], entry["package"] = _package(spec, model, builds, cfg, log, out)
            if builds.slice_batch is not None:
                files[name][SLICE_PACKAGE_FILE], entry["slice_package"] = _package(spec, model, builds, cfg, log, out,
                                                                                   builds.slice_batch)
        entry["serves"] = served_ranges(cfg.serving.runtime if builds is not None else "onnxruntime",
                                        cfg.serving.max_batch, builds is not None and builds.slice_batch is not None)
        entries[name] = entry
    return files, entries


def _checked_routes(model, graph_files: dict, meta: ModelMeta, detector, log, out: Path) -> dict:
    """biva_score's route for every estimator (and biva_detect's), run on the exported scorer in ONNX Runtime with
    the served plan (scoring.run_score), against PyTorch's evaluate_request on fresh images; ExportError beyond the
    graphs' tolerances."""
    from biva_core.contract import SCORER

    from .onnx_export import validate_score_routes

    reps = validate_score_routes(model, graph_files[SCORER]["model.onnx"], meta, detector)
    for rep in reps:
        _checked(rep, log, out)
    return {rep.name: {"max_abs_diff": rep.max_abs_diff, "atol": rep.atol} for rep in reps}


def _checked(rep, log, out: Path) -> dict:
    """A validation report's entry; raises ExportError (nothing written) when it failed."""
    log("  " + rep.summary())
    if not rep.ok:  # fail fast: nothing is written, the remaining graphs are not exported
        details = ", ".join(f"{k} {v:.3g} > {rep.atol[k]:.3g}" for k, v in rep.max_abs_diff.items()
                            if v > rep.atol[k])
        raise ExportError(f"validation failed, {out} left untouched: {rep.name}: max |{rep.runtime} - torch| {details}")
    return {"max_abs_diff": rep.max_abs_diff, "atol": rep.atol, "batches": rep.batches, "free_axes": rep.free,
            "ok": rep.ok}


def _package(spec, model, builds, cfg: ExportConfig, log, out: Path, batch: int | None = None) -> tuple[Path, dict]:
    """The graph's AOTInductor package (compiled in a worker process, or from the cache), validated like the ONNX
    graph; its path and report entry. `batch`: the package for exactly that many images."""
    from .aoti import validate_package

    path, seconds, cached = builds.result(spec.name, batch)
    what = "AOTInductor package" + ("" if batch is None else f" for {batch}-image slices")
    log(f"  {spec.name}: {what} " + ("from the cache" if cached else f"compiled in {seconds:.0f} s"))
    entry = {"bytes": path.stat().st_size, "compile_s": round(seconds, 1), "cached": cached, "isa": builds.isa}
    if cfg.validate:
        entry.update(_checked(validate_package(spec, model, path, atol_scale=cfg.atol_scale, batch=batch), log, out))
    return path, entry


# Memory sizing (the natural-image models). A natural32 row carries 2.7 MiB of float32 tensors through a graph call (noise
# 234,400 + z, q_mu, q_log_std 156,320 each + the image), and ONNX Runtime's peak grows by about 2.7x that
# per row (measured, one thread: encoder 7.0 MB/row, scorer 7.4, sampler 5.2, over 1.0 / 1.0 / 0.5 GB of
# weights): 1024 rows would need about 22 GB for the three graphs. Binary models' rows are a few KB.
GRAPH_CALL_BYTES = 512 << 20  # row tensors per graph call, shared by a graph's instances: natural32 gets 128
#                                rows with one instance (about 4.8 GB, 3 graphs), 64 with the default two
REQUEST_BYTES = 128 << 20  # latents per request (an encode answer is 3 per image): natural32, 64 images


def _pow2_at_most(n: int) -> int:
    return 1 << max(n, 1).bit_length() - 1


def fit_to_memory(cfg: ExportConfig, latent_dim: int, noise_dim: int, image_shape: tuple[int, ...]) -> ExportConfig:
    """`cfg` with the graphs' max batch and the images-per-request cap lowered (to powers of two) where a
    model's rows are too large for the defaults; binary models and anything already small are unchanged.
    Every instance of a graph model runs its own calls, so the row budget is shared out between them."""
    pixels = int(math.prod(image_shape))
    budget = GRAPH_CALL_BYTES // max(1, cfg.serving.instances)
    rows = _pow2_at_most(budget // (4 * (noise_dim + 3 * latent_dim + pixels)))
    images = _pow2_at_most(REQUEST_BYTES // (4 * (3 * latent_dim + pixels)))
    return replace(cfg, serving=replace(cfg.serving, max_batch=min(cfg.serving.max_batch, rows)),
                   caps=replace(cfg.caps, max_images=min(cfg.caps.max_images, images)))


def _package_builds(ckpt: Path, model, graphs: list[str], tmp: Path, cfg: ExportConfig, log, build: bool):
    """The aoti runtime's packages, started now in worker processes (None for the onnxruntime runtime, or where the
    layout serves no package: `build` False, package_plan)."""
    if not build:
        return None
    from .aoti import PackageBuilds, wants_slice_package

    builds = PackageBuilds(ckpt, graphs, tmp, AOTI_SLICE_ROWS if cfg.slice_packages and wants_slice_package(model)
                           else None)
    if builds.jobs:
        log(f"compiling {len(builds.jobs)} AOTInductor packages in worker processes (a minute or two; "
            "--runtime onnxruntime skips them) ...")
    return builds


def model_meta(model, data_meta: dict, cfg: ExportConfig, checkpoint_sha256: str) -> ModelMeta:
    return ModelMeta(image_shape=tuple(model.cfg.image_shape), likelihood=model.cfg.likelihood,
                     binarize=binarization(data_meta), n_layers=model.cfg.n_layers,
                     latent_dim=model.latent_dim, noise_dim=model.noise_dim, groups=tuple(model.group_names()),
                     graph_max_batch=cfg.serving.max_batch, checkpoint_sha256=checkpoint_sha256,
                     estimator=DEFAULT_ESTIMATOR, caps=cfg.caps)


def detector_file(ckpt: Path, cfg: ExportConfig, source: str | None) -> Path | None:
    """The detector to serve: cfg.detector, or with "auto" the checkpoint's own where there is one."""
    if cfg.detector != "auto":
        return Path(cfg.detector) if cfg.detector else None
    own = Path(source or ckpt).with_suffix(".detector.json")
    return own if own.is_file() else None


def load_detector(path: Path, meta: ModelMeta):
    """The fitted detector at `path`, checked against the exported model (ExportError, one line, otherwise)."""
    from biva_core.stats import Detector

    try:
        det = Detector.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"--detector {path}: {type(e).__name__}: {e}") from None
    fitted = det.checkpoint()
    if fitted != meta.checkpoint_sha256:
        raise ExportError(f"--detector {path} was fitted on the model with checkpoint sha256 {str(fitted)[:12]}..., "
                          f"this checkpoint's is {meta.checkpoint_sha256[:12]}...; fit it again on this model")
    return det


def run_export(ckpt: Path, out: Path, cfg: ExportConfig = ExportConfig(), log: Callable[[str], object] = print,
               source: str | None = None) -> dict:
    """Export, validate and write the repository; returns the report. Raises ExportError.

    `source` is the checkpoint path recorded in the report when `ckpt` is a private copy of it.
    """
    from biva_core.checkpoint import load_model

    from .graphs import graph_specs, inference_copy

    if cfg.serving.runtime == "aoti" and cfg.serving.backend != "python":
        raise ExportError("--runtime aoti needs the python backend (the packages run inside its models); "
                          f"got --backend {cfg.serving.backend}")
    if written_by_others(out, REPORT) and not cfg.force:
        raise ExportError(f"{out} exists and was not written by biva-export; pass --force to replace it")
    build, threads, why = package_plan(cfg)
    model, data_meta = load_model(ckpt)
    fitted = fit_to_memory(cfg, model.latent_dim, model.noise_dim, model.cfg.image_shape)
    if fitted != cfg:
        log(f"memory: graph max batch {cfg.serving.max_batch} -> {fitted.serving.max_batch} rows, images per "
            f"request {cfg.caps.max_images} -> {fitted.caps.max_images} (rows of this model are large)")
        cfg = fitted
    plain = inference_copy(model)
    specs = graph_specs(plain)
    report = _report_head(ckpt, cfg, source)
    if cfg.serving.backend == "python":
        report["packages"] = {"built": build, "threads_per_instance": threads, "target_threads": cfg.target_threads,
                              "why": why}
        log(f"AOTInductor packages: {why}")
    meta = model_meta(model, data_meta, cfg, sha256_file(ckpt))
    det_path = detector_file(ckpt, cfg, source)
    detector = load_detector(det_path, meta) if det_path else None
    with tempfile.TemporaryDirectory(prefix="biva-onnx-") as tmp:
        builds = _package_builds(ckpt, model, list(specs), Path(tmp), cfg, log, build)
        try:
            graph_files, report["graphs"] = _export_and_validate(model, plain, specs, Path(tmp), cfg, log, out, builds)
        finally:
            if builds is not None:
                builds.close()
        if cfg.validate:
            report["routes"] = _checked_routes(model, graph_files, meta, detector, log, out)
        report["meta"] = json.loads(meta.to_json())
        isa = builds.isa if builds is not None else None
        configs = {name: graph_config(spec, cfg.serving, meta, isa) for name, spec in specs.items()}
        fronts = {n: s for n, s in meta.front_specs().items() if n != DETECT or detector is not None}
        configs.update({name: front_config(spec, meta, cfg.serving, detector.summary() if name == DETECT else None)
                        for name, spec in fronts.items()})
        extra = {DETECT: {DETECTOR_FILE: det_path}} if detector is not None else {}
        if detector is not None:
            report["detector"] = {"file": str(det_path), **detector.summary()}
        staged = staging_dir(out)
        try:
            write_model_files(staged, configs, graph_files, cfg.serving.backend, extra)
            (staged / REPORT).write_text(json.dumps(report, indent=2) + "\n")
            swap_into_place(staged, out)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    log(f"wrote {out} ({cfg.serving.backend} backend): {', '.join(sorted(configs))}; report in {out / REPORT}")
    return report
