"""`biva-export --ckpt model.pt`: three validated ONNX graphs and the Triton model repository.

A thin click layer: the options become one frozen `ExportConfig` for `biva_export.pipeline.run_export`.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from .pipeline import ExportConfig, ExportError, run_export
from .serving_config import ServingConfig


@contextlib.contextmanager
def one_line_errors(debug: bool, *kinds: type[BaseException]):
    """The user sees `Error: <message>` and exit code 1 for these exceptions; --debug shows the traceback."""
    try:
        yield
    except kinds as e:
        if debug:
            raise
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="BIVA checkpoint written by biva-train (model.pt).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("triton_models"),
              show_default=True, help="Model repository to write (replaced atomically).")
@click.option("--backend", type=click.Choice(["python", "onnxruntime"]), default="python", show_default=True,
              help="python: ONNX Runtime inside Triton's python backend (CPU, or CUDA with onnxruntime-gpu). "
                   "onnxruntime: native onnxruntime_onnx configs on KIND_GPU with TensorRT, for NVIDIA's container.")
@click.option("--runtime", type=click.Choice(["aoti", "onnxruntime"]), default=None,
              help="What runs the graphs in the python backend. aoti [default with --backend python]: AOTInductor "
                   "packages compiled from the same graphs, from 8 rows a call on instances of 2 or more threads, "
                   "ONNX Runtime for the rest (the fastest route measured; the packages are compiled only where the "
                   "layout runs them, see --target-threads: a minute or two, or their cache). onnxruntime [default "
                   "with --backend onnxruntime]: ONNX Runtime alone (export in seconds).")
@click.option("--slice-packages/--no-slice-packages", default=True, show_default=True,
              help="With --runtime aoti: also a package per graph for exactly 32 images, which full 32-image slices "
                   "run on (0-10% faster in alternated calls, about 40 s more compile on a cold cache; models of "
                   "small weights only).")
@click.option("--opset", default=18, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="torch.onnx exporter: the tracing one (fast) or dynamo/torch.export.")
@click.option("--elu", type=click.Choice(["auto", "decomposed", "native"]), default="auto", show_default=True,
              help="How the graphs write ELU: as Max(x, Exp(Min(x, 0)) - 1), faster in ONNX Runtime's CPU provider, "
                   "or as the Elu node; auto: decomposed for the python backend, native for the onnxruntime (GPU) one.")
@click.option("--max-batch-size", default=1024, show_default=True,
              help="Rows per graph call (Triton max_batch_size of the graph models).")
@click.option("--instances", default=2, show_default=True,
              help="Instances per graph model (each a process; one request's graph calls go to them in parallel). "
                   "At least 2 with dynamic batching: Triton 2.51 leaves some requests to a lone instance waiting "
                   "0.5 s.")
@click.option("--queue-delay-us", default=ServingConfig.queue_delay_us, show_default=True,
              help="Dynamic batcher: longest a request waits for others to join its batch (microseconds; 0: batch "
                   "what is queued when an instance frees up).")
@click.option("--preferred-batch-size", "preferred", multiple=True, type=click.IntRange(0),
              help=f"Dynamic batcher preferred batch size of the graph models (repeatable; 0: none, batch whatever "
                   f"has arrived) [default: {ServingConfig.preferred[0]}, so a front's calls to both instances never "
                   "merge into one; none with --backend onnxruntime].")
@click.option("--front-instances", default=ServingConfig.front_instances, show_default=True, type=click.IntRange(1),
              help="Instances per front (API) model: requests each model runs at once (each waits on its graph "
                   "calls, so more let concurrent requests reach the graph models together); its queue holds "
                   f"{ServingConfig.front_queue_per_instance} more per instance.")
@click.option("--threads", default=0, show_default=True,
              help="ONNX Runtime intra-op threads per python-backend graph instance (0: the cores / --instances).")
@click.option("--target-threads", default=0, show_default=True, type=click.IntRange(0),
              help="Threads per graph instance on the machine the repository will serve on (0: this machine's "
                   "layout, its cores / --instances, or --threads). The AOTInductor packages are compiled and "
                   "validated only when that is 2 or more: instances of fewer threads serve ONNX Runtime at every "
                   "size (the default layout on 2 cores). For bigger machines, the cores per pod / "
                   "--instances: 4 for 8-core pods with 2 instances; the Kubernetes deployment's 2-CPU pods need "
                   "none.")
@click.option("--spinning/--no-spinning", default=False, show_default=True,
              help="Idle ONNX Runtime intra-op threads of the graph models busy-wait for work (ONNX Runtime's "
                   "default; it burns cores other processes could use, and served no faster here) or sleep.")
@click.option("--detector", default="auto", show_default=True,
              help="Fitted OOD detector (biva-client ood fit) to serve as biva_detect: a file, 'none', or auto: the "
                   "checkpoint's own (CKPT with .detector.json for .pt) where it exists.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check every graph against PyTorch before writing anything.")
@click.option("--atol-scale", default=1.0, show_default=True,
              help="Multiply every validation tolerance (1e-3 nats, 1e-4 for images); 0 demands exact equality.")
@click.option("--publish", "publish_url", default=None, metavar="s3://BUCKET/PREFIX",
              help="After the export validated, publish OUT there (as biva-publish does: every file, then the "
                   "manifest last); AWS_ENDPOINT_URL and the credentials come from the environment.")
@click.option("--force", is_flag=True, help="Replace OUT even if it was not written by biva-export.")
@click.option("--verbose", is_flag=True, help="Show the ONNX exporter's own output.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, out, backend, runtime, slice_packages, opset, exporter, elu, max_batch_size, instances, queue_delay_us,
         preferred, front_instances, threads, target_threads, spinning, detector, validate, atol_scale, publish_url,
         force, verbose, debug):
    """Export a BIVA checkpoint to ONNX, validate it, and write the Triton model repository."""
    from biva_core.checkpoint import CheckpointError

    runtime = runtime or ("onnxruntime" if backend == "onnxruntime" else "aoti")
    serving = ServingConfig(backend=backend, runtime=runtime, max_batch=max_batch_size, instances=instances,
                            front_instances=front_instances, threads=threads, spinning=spinning,
                            preferred=tuple(p for p in preferred if p) if preferred else
                            (ServingConfig.preferred if backend == "python" else ()), queue_delay_us=queue_delay_us)
    cfg = ExportConfig(opset=opset, exporter=exporter, elu=elu, validate=validate, atol_scale=atol_scale, force=force,
                       quiet=not verbose, serving=serving, slice_packages=slice_packages,
                       target_threads=target_threads,
                       detector=None if detector.lower() == "none" else ("auto" if detector == "auto" else Path(detector)))
    from biva_core.storage import StorageError, parse_url

    with one_line_errors(debug, ExportError, CheckpointError, ValueError, StorageError):
        if publish_url is not None:
            parse_url(publish_url)  # a bad URL fails now, not after the export's minutes
            if not validate:
                raise StorageError("--publish needs a validated export; drop --no-validate")
        run_export(ckpt, out, cfg, log=click.echo)
        if publish_url is not None:
            from .publish import publish

            publish(out, publish_url, log=click.echo)


if __name__ == "__main__":
    main()
