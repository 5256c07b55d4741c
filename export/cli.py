"""`biva-export --ckpt model.pt`: three validated ONNX graphs and the Triton model repository.

Steps: load the checkpoint -> fold weight norm -> export sampler, encoder, scorer (dynamic batch) ->
onnx.checker(full_check) -> ONNX Runtime vs PyTorch on fresh random inputs -> write the repository in
a staging folder -> swap it into place. Nothing is replaced unless every graph passes validation.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import click

from .repository import DEFAULT_CAPS, front_config, front_specs, graph_config, staging_dir, swap_into_place, \
    write_model_files

REPORT = "export_report.json"


class ExportError(RuntimeError):
    """Export or validation failed; the message says which graph and by how much."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def run_export(ckpt: Path, out: Path, backend: str = "python", opset: int = 18, max_batch_size: int = 1024,
               instances: int = 1, front_instances: int = 2, threads: int = 0, validate: bool = True,
               force: bool = False, atol_scale: float = 1.0, caps: dict | None = None,
               log=click.echo, quiet: bool = True, exporter: str = "torchscript",
               preferred_batch_sizes: tuple[int, ...] = (), queue_delay_us: int = 500,
               source: str | None = None) -> dict:
    """Export, validate and write the repository; returns the report. Raises ExportError.

    `source` is the checkpoint path recorded in the report when `ckpt` is a private copy of it.
    """
    import onnx
    import onnxruntime
    import torch

    from biva_core.checkpoint import load_model

    from .graphs import graph_specs, inference_copy
    from .onnx_export import export_graph, validate_graph

    if out.exists() and not (out / REPORT).exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and was not written by biva-export; pass --force to replace it")
    model, data_meta = load_model(ckpt)
    plain = inference_copy(model)
    specs = graph_specs(plain)
    caps = {**DEFAULT_CAPS, **(caps or {})}
    report = {
        "checkpoint": source or str(ckpt), "checkpoint_sha256": sha256_file(ckpt), "backend": backend, "opset": opset,
        "exporter": exporter,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "validated": validate, "graphs": {},
    }
    with tempfile.TemporaryDirectory(prefix="biva-onnx-") as tmp:
        onnx_files = {}
        for name, spec in specs.items():
            path = Path(tmp) / f"{name}.onnx"
            log(f"exporting {name} ...")
            with _quiet_exporter(quiet):
                export_graph(spec, plain, path, opset, exporter)
            onnx_files[name] = path
            entry = {"bytes": path.stat().st_size, "inputs": spec.input_names, "outputs": spec.output_names}
            if validate:
                rep = validate_graph(spec, model, path, atol_scale=atol_scale)
                log("  " + rep.summary())
                entry.update({"max_abs_diff": rep.max_abs_diff, "atol": rep.atol, "batches": rep.batches,
                              "ok": rep.ok})
                if not rep.ok:  # fail fast: nothing is written, the remaining graphs are not exported
                    details = ", ".join(f"{k} {v:.3g} > {rep.atol[k]:.3g}" for k, v in rep.max_abs_diff.items()
                                        if v > rep.atol[k])
                    raise ExportError(f"validation failed, {out} left untouched: {name}: max |ORT - torch| {details}")
            report["graphs"][name] = entry

        meta = {"image_shape": list(model.cfg.image_shape), "likelihood": model.cfg.likelihood,
                "binarize": data_meta.get("binarize", "threshold"), "n_layers": model.cfg.n_layers,
                "latent_dim": model.latent_dim, "noise_dim": model.noise_dim, "groups": model.group_names(),
                "graph_max_batch": max_batch_size, "caps": caps,
                "graphs": {"sampler": "biva_sampler", "encoder": "biva_encoder", "scorer": "biva_scorer"}}
        report["meta"] = meta
        configs = {name: graph_config(spec, backend, max_batch_size, instances, threads, preferred_batch_sizes,
                                   queue_delay_us)
                   for name, spec in specs.items()}
        configs.update({name: front_config(spec, meta, front_instances)
                        for name, spec in front_specs(tuple(model.cfg.image_shape), model.latent_dim,
                                                      len(model.groups)).items()})
        staged = staging_dir(out)
        try:
            write_model_files(staged, configs, onnx_files, backend)
            (staged / REPORT).write_text(json.dumps(report, indent=2) + "\n")
            swap_into_place(staged, out)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    log(f"wrote {out} ({backend} backend): {', '.join(sorted(configs))}; report in {out / REPORT}")
    return report


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="BIVA checkpoint written by biva-train (model.pt).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository to write (replaced atomically).")
@click.option("--backend", type=click.Choice(["python", "onnxruntime"]), default="python", show_default=True,
              help="python: ONNX Runtime inside Triton's python backend (CPU, or CUDA with onnxruntime-gpu). "
                   "onnxruntime: native onnxruntime_onnx configs on KIND_GPU with TensorRT, for NVIDIA's container.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="torch.onnx exporter: the tracing one (fast) or dynamo/torch.export.")
@click.option("--max-batch-size", default=1024, show_default=True,
              help="Rows per graph call (Triton max_batch_size of the graph models).")
@click.option("--instances", default=1, show_default=True, help="Instances per graph model.")
@click.option("--queue-delay-us", default=500, show_default=True,
              help="Dynamic batcher: longest a request waits for others to join its batch (microseconds).")
@click.option("--preferred-batch-size", "preferred", multiple=True, type=int,
              help="Dynamic batcher preferred batch size (repeatable; default none: batch whatever has arrived).")
@click.option("--front-instances", default=2, show_default=True, help="Instances per front (API) model.")
@click.option("--threads", default=0, show_default=True,
              help="ONNX Runtime intra-op threads per python-backend graph instance (0: all cores).")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check every graph against PyTorch before writing anything.")
@click.option("--atol-scale", default=1.0, show_default=True,
              help="Multiply every validation tolerance (1e-3 nats, 1e-4 for images); 0 demands exact equality.")
@click.option("--force", is_flag=True, help="Replace OUT even if it was not written by biva-export.")
@click.option("--verbose", is_flag=True, help="Show the ONNX exporter's own output.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, out, backend, opset, exporter, max_batch_size, instances, queue_delay_us, preferred, front_instances, threads, validate, atol_scale, force,
         verbose, debug):
    """Export a BIVA checkpoint to ONNX, validate it, and write the Triton model repository."""
    from biva_core.checkpoint import CheckpointError

    try:
        run_export(ckpt, out, backend, opset, max_batch_size, instances, front_instances, threads, validate, force,
                   atol_scale, quiet=not verbose, exporter=exporter, preferred_batch_sizes=tuple(preferred),
                   queue_delay_us=queue_delay_us)
    except (ExportError, CheckpointError, ValueError) as e:
        if debug:
            raise
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
