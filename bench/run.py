"""`run_bench`: every figure of the benchmark, in one pass, written to an output folder.

    checkpoint -> (repository: given, or exported here) -> GEMM rate, FLOPs per image
    -> in process: PyTorch eager, torch.compile, ONNX Runtime   (no server running)
    -> Triton, dynamic batching on: HTTP and gRPC per case and batch, then the concurrency sweep
    -> Triton, dynamic batching off: the concurrency sweep
    -> ratios against the targets, JSON, markdown, plots

One server at a time, each stopped before the next starts; the client runs on the same cores as the
server (as perf_analyzer would on this machine), which the JSON notes.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from biva_core.checkpoint import sha256_file
from biva_core.contract import DETECT, ENCODE, ENCODER, FRONT_GRAPHS, KS, REPORT, SAMPLE, SAMPLES, SCORER, T, read_meta
from biva_core.routing import AOTI_MIN_ROWS, PACKAGE_FILE, SLICE_PACKAGE_FILE
from biva_core.runtimes import OrtOptions, ort_session
from biva_core.scoring import IW_CALL_ROWS, score_plan

from .backends import (POOL, AotiRunner, Case, CompiledRunner, OrtRunner, ServedRunner, TorchRunner,
                       alternated_medians, api_case, api_feeds, api_load_feeds, api_loads, async_call, inprocess_call,
                       make_cases, request_feeds, sync_call, triton_inputs)
from .config import ALTERNATED, ALTERNATED_API, SMALL_TURN, BenchConfig
from .cpu import CPU_KEY, cpu_per_request, tree_cpu
from .flops import gemm_rate, onnx_flops_per_row, torch_flops_per_row
from .loadgen import infer_inputs
from .measure import MeasureConfig, measure_async, measure_sync
from .report import add_achieved, compile_summary, compute_ratios, write_outputs
from .triton import Variant, exported_instances, exported_serving, stats_delta, stats_snapshot, write_variant

RESULT = "bench.json"


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message is one line."""


def system_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "numpy", "tritonclient", "nvidia-pytriton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "threads": threads, "platform": platform.platform(), "versions": versions,
            "load_average_at_start": list(os.getloadavg())}


def _check_repo(repo: Path, ckpt: Path) -> None:
    """The served graphs must hold the checkpoint's weights, or PyTorch and ONNX compare different models."""
    report = repo / REPORT
    if not report.is_file():
        raise BenchError(f"{repo}: no export_report.json; write the repository with biva-export")
    try:
        want = read_meta(repo).checkpoint_sha256
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError(f"{repo}: {report} holds no model metadata ({e}); export it again") from None
    if want != sha256_file(ckpt):
        raise BenchError(f"{repo} was exported from another checkpoint than {ckpt} (sha256 differs)")


def _ort_session(path: Path, cfg: BenchConfig, work: Path, spinning: bool | None = None):
    """A session at the config's optimisation level; with ort_saved_graph, optimised once, saved, and the saved
    graph loaded without optimising again (only that load is timed). spinning None: ONNX Runtime's default."""
    t = time.perf_counter()
    if cfg.ort_saved_graph:
        saved = work / f"{path.parent.parent.name}.{path.stem}.opt.onnx"  # unique per graph file
        ort_session(str(path), OrtOptions(cfg.threads, cfg.ort_level, saved_graph=str(saved)))
        t = time.perf_counter()
        sess = ort_session(str(saved), OrtOptions(cfg.threads, "disable", spinning=spinning))
    else:
        sess = ort_session(str(path), OrtOptions(cfg.threads, cfg.ort_level, spinning=spinning))
    return sess, time.perf_counter() - t


def _elu_native_copy(path: Path, work: Path) -> Path:
    """The graph at `path` with its ELUs as single Elu nodes (graph_passes.compose_elu), written into `work`."""
    import onnx

    from biva_export.graph_passes import compose_elu

    out = work / f"{path.parent.parent.name}.elu_native.onnx"
    if not out.exists():
        proto = onnx.load(str(path))
        compose_elu(proto)
        onnx.save(proto, str(out))
    return out


def _graph_files(repo: Path, specs: dict) -> dict[str, Path]:
    return {g: repo / g / "1" / "model.onnx" for g in specs}


def _batches(cfg: BenchConfig, case: Case) -> tuple[int, ...]:
    return getattr(cfg, case.batches)


def _mcfg(cfg: BenchConfig, case: Case) -> MeasureConfig:
    return getattr(cfg, case.measure)


def _line(case: str, backend: str, batch: int, m: dict) -> str:
    if "skipped" in m:
        return f"  {case:10s} {backend:12s} b={batch:<4d} skipped: {m['skipped']}"
    lat = m["latency_ms"]
    return (f"  {case:10s} {backend:12s} b={batch:<4d} {m['images_per_s']:10.1f} img/s  p50 {lat['p50']:8.2f} ms  "
            f"p99 {lat['p99']:8.2f} ms{'' if m['stable'] else '  (not stable)'}")


def bench_inprocess(cfg: BenchConfig, cases: dict[str, Case], repo: Path, plain, specs, results: dict, work: Path,
                    log: Callable[[str], Any]) -> tuple[dict[str, float], dict[tuple[str, int], Callable]]:
    """PyTorch eager, torch.compile and ONNX Runtime, same weights, same thread count, one caller. Each
    case's compile seconds (first call per row count, never timed) go into its entry as `compile_s`. Returns the
    ONNX Runtime sessions' load seconds per graph and the served route's calls per (case, batch), which the
    gRPC clients alternate with (ALTERNATED_API)."""
    from biva_export.graphs import GRAPH_MODULES
    from biva_export.onnx_export import example_inputs

    graphs, graph_max = _graph_files(repo, specs), read_meta(repo).graph_max_batch
    load_s: dict[str, float] = {}
    served_calls: dict[tuple[str, int], Callable] = {}
    compiled: dict[str, CompiledRunner] = {}  # one per graph: the score cases reuse the scorer's
    for name, case in cases.items():
        spec = specs[case.graph]
        make = lambda rows, seed, samples=1, ks=1, spec=spec: example_inputs(  # noqa: E731
            spec, plain, rows, seed, samples, ks)
        runners = {}
        if "torch" in cfg.backends:
            runners["torch"] = TorchRunner(GRAPH_MODULES[case.graph](plain), spec)
        if "compile" in cfg.backends:
            if case.graph not in compiled:
                compiled[case.graph] = CompiledRunner(GRAPH_MODULES[case.graph](plain), spec)
            runners["compile"] = compiled[case.graph]
            results[name]["compile_s"] = compiled[case.graph].compile_s  # graph rows -> s, filled by prepare
        if "ort" in cfg.backends:
            sess, load_s[case.graph] = _ort_session(graphs[case.graph], cfg, work)
            runners["ort"] = OrtRunner(sess)
        package = graphs[case.graph].parent / PACKAGE_FILE
        if "aoti" in cfg.backends:
            if not package.is_file():
                raise BenchError(f"{package}: no AOTInductor package; export with biva-export --runtime aoti")
            runners["aoti"] = AotiRunner(package, spec, cfg.threads)
        if "served" in cfg.backends:  # an ONNX-only repository serves ONNX Runtime alone; spinning as served
            ort = OrtRunner(_ort_session(graphs[case.graph], cfg, work, exported_serving(repo).spinning)[0])
            sliced = package.parent / SLICE_PACKAGE_FILE
            runners["served"] = ServedRunner(ort, runners.get("aoti") or AotiRunner(package, spec, cfg.threads),
                                             AotiRunner(sliced, spec, cfg.threads) if sliced.is_file() else None,
                                             cfg.threads) if package.is_file() else ort
        if "ort_elu_native" in cfg.backends:
            native = _elu_native_copy(graphs[case.graph], work)
            runners["ort_elu_native"] = OrtRunner(_ort_session(native, cfg, work)[0])
        calls = {(backend, b): inprocess_call(runner, case, make, b, graph_max, cfg.seed + b, spec)
                 for backend, runner in runners.items() for b in _batches(cfg, case)}
        for (backend, b), call in calls.items():
            m, _ = measure_sync(call, b, _mcfg(cfg, case))
            results[name]["results"].setdefault(backend, {})[str(b)] = m.to_dict()
            log(_line(name, backend, b, m.to_dict()))
        if all(be in runners for be in ALTERNATED) and cfg.alternated_reps and case.alternated:
            results[name]["alternated"] = {str(b): _alternated({be: calls[be, b] for be in ALTERNATED}, b, cfg, name,
                                                               log) for b in _batches(cfg, case)}
        if "served" in runners:
            served_calls.update({(name, b): calls["served", b] for b in _batches(cfg, case)})
        if "compile" in runners:
            log(f"  {name:10s} " + compile_summary(results[name]["compile_s"]))
    return load_s, served_calls


def _alternated(calls: dict[str, Callable[[int], Any]], b: int, cfg: BenchConfig, case: str,
                log: Callable[[str], Any]) -> dict[str, Any]:
    """Images/s of each of `calls` (backend -> call(i)) at batch b from calls in turn (backends.alternated_medians):
    the same machine state for all, where the windows measure each backend in its own stretch of time. Below
    AOTI_MIN_ROWS rows each turn is SMALL_TURN calls after an untimed one: there the served route is ONNX Runtime,
    and a few-millisecond call right after torch.compile's meets its threads still spin-waiting (measured with one
    call a turn: the sampler's served batch-1 rate fell from 550 to 370 images/s), which a graph model instance
    never sees."""
    def zero_arg(call):
        i = itertools.count(POOL)  # call i draws inputs i % POOL; the windows began at 0
        return lambda: call(next(i))

    turn, settle = (cfg.alternated_turn, 0) if b >= AOTI_MIN_ROWS else (max(cfg.alternated_turn, SMALL_TURN), 1)
    seconds = alternated_medians({be: zero_arg(c) for be, c in calls.items()}, cfg.alternated_reps, turn, settle)
    ips = {be: b / s for be, s in seconds.items()}
    log(f"  {case:10s} alternated   b={b:<4d} " + ", ".join(f"{be} {v:.1f}" for be, v in ips.items())
        + f" img/s ({cfg.alternated_reps} rounds of {turn}{', after 1 untimed' if settle else ''})")
    return {"images_per_s": ips, "reps": cfg.alternated_reps, "turn": turn, "settle": settle}


@contextlib.contextmanager
def _server(repo: Path, log_path: Path, direct: bool = True):
    """tritonserver on `repo`: with `direct`, Triton's own endpoints (--biva-direct, as the graph sweep and the
    per-case cells were measured before the fronts existed; studies/front_latency.py measures the fronts), else
    as users start it (the HTTP and gRPC fronts and the supervisor)."""
    from biva_serving.net import DIRECT_FLAG
    from biva_serving.process import start_server

    handle = start_server(repo, log_path=log_path, extra_args=[DIRECT_FLAG] if direct else [])
    try:
        yield handle
    finally:
        handle.stop()


def bench_triton_sync(cfg: BenchConfig, cases: dict[str, Case], server, repo: Path, run: "_Servers",
                      results: dict) -> str:
    """One blocking client per protocol, per case and batch; Triton's statistics over the reported windows. The
    API model's calls from AOTI_MIN_ROWS rows run again in turn with the served route in process (ALTERNATED_API),
    which the gRPC / in-process ratio comes from."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from biva_export.onnx_export import example_inputs

    protocols = [(p, mod, url) for p, mod, url in (("triton_http", httpclient, server.http_url),
                                                   ("triton_grpc", grpcclient, server.grpc_url),
                                                   ("triton_grpc_api", grpcclient, server.grpc_url))
                 if p in cfg.backends]
    version, plain, specs, log = "", run.plain, run.specs, run.log
    for backend, mod, url in protocols:
        api = backend == "triton_grpc_api"
        timeout = max(c.network_timeout_s for c in cases.values())  # the slowest case's (Case.network_timeout_s)
        client = mod.InferenceServerClient(url, network_timeout=timeout) if mod is httpclient \
            else mod.InferenceServerClient(url)
        try:
            version = version or _server_version(client)
            for name, case in cases.items():
                if api and case.score is not None:
                    continue  # a score case is a biva_score request already
                spec = specs[case.graph]
                make = lambda rows, seed, spec=spec: example_inputs(spec, plain, rows, seed)  # noqa: E731
                called = api_case(case) if api else case
                outputs = _outputs(called, specs)
                limit = read_meta(repo).graph_max_batch
                for b in _batches(cfg, case):
                    if case.score is None and b > limit and not api:
                        entry = {"skipped": f"batch {b} > the graph model's max_batch_size {limit}"}
                    else:
                        bodies = [infer_inputs(mod, f) for f in api_feeds(case, make, b, cfg.seed + b)] if api \
                            else triton_inputs(mod, case, make, b, cfg.seed + b)
                        call = sync_call(client, mod, called.triton_model, bodies, outputs)
                        m, snaps = measure_sync(call, b, _mcfg(cfg, case), _stats_fn(client, mod, called))
                        entry = m.to_dict()
                        entry["server"] = _server_stats(snaps, called)
                        if api and b >= AOTI_MIN_ROWS and cfg.alternated_reps and (name, b) in run.served_calls:
                            results[name].setdefault("alternated_api", {})[str(b)] = _alternated(
                                dict(zip(ALTERNATED_API, (call, run.served_calls[name, b]))), b, cfg, name, run.log)
                    results[name]["results"].setdefault(backend, {})[str(b)] = entry
                    log(_line(name, backend, b, entry))
        finally:
            client.close()
    return version


def _outputs(case: Case, specs) -> list[str]:
    """What a client asks `case.triton_model` for: a graph's outputs, or the bounds a score request is about."""
    if case.triton_model in (SAMPLE, ENCODE):
        return [T.images] if case.triton_model == SAMPLE else [T.z, T.q_mu, T.q_log_std, T.kl]
    if case.score is None:
        return specs[case.graph].output_names
    return [T.iw_bound] if case.score.want_iw else [T.elbo, T.l_gt_k]


def _server_version(client) -> str:
    meta = client.get_server_metadata()
    return meta["version"] if isinstance(meta, dict) else meta.version


def _stats_models(case: Case) -> list[str]:
    return [case.triton_model] + ([case.graph] if case.graph != case.triton_model else [])


def _stats_fn(client, mod, case: Case):
    grpc = not mod.__name__.endswith("http")

    def snap() -> dict[str, dict]:
        out = {}
        for m in _stats_models(case):
            raw = client.get_inference_statistics(m, as_json=True) if grpc else client.get_inference_statistics(m)
            out[m] = stats_snapshot(raw, m)
        return out
    return snap


def _server_stats(snaps: list[dict], case: Case) -> dict[str, dict]:
    """Deltas over the reported windows (the last 3, or fewer when the run stopped early)."""
    before, after = snaps[max(0, len(snaps) - 4)], snaps[-1]
    return {m: stats_delta(before[m], after[m]) for m in _stats_models(case)}


def _sweep_entry(m, snaps: list, label: str, n: int, log) -> dict:
    entry = m.to_dict()
    entry["server"] = srv = stats_delta(snaps[max(0, len(snaps) - 4)], snaps[-1])
    log(f"  {label:22s} c={n:<3d} {entry['images_per_s']:10.1f} img/s  p50 {entry['latency_ms']['p50']:8.2f} ms"
        f"  p99 {entry['latency_ms']['p99']:8.2f} ms  queue {srv.get('queue_us', 0):8.0f} us  compute "
        f"{srv.get('compute_infer_us', 0):8.0f} us  batch {srv.get('mean_batch_rows', 0):.1f}  client CPU "
        f"{(entry['load'] or {}).get('client_cpu_us_per_call') or 0:5.0f} us/call"
        f"{'' if entry['stable'] else '  (not stable)'}")
    return entry


async def _sweep_async(url: str, case: Case, bodies, levels, mcfg: MeasureConfig, log, label: str) -> dict:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    out = {}
    try:
        async def snap():
            raw = await client.get_inference_statistics(case.triton_model, as_json=True)
            return stats_snapshot(raw, case.triton_model)

        for n in levels:
            m, snaps = await measure_async(async_call(client, case.triton_model, bodies), n, 1, mcfg, snap)
            out[str(n)] = _sweep_entry(m, snaps, label, n, log)
    finally:
        await client.close()
    return out


def _sweep_processes(url: str, case: Case, feeds: list[dict], cfg: BenchConfig, log, label: str) -> dict:
    """cfg's concurrency levels, measure windows, client processes and neighbour."""
    levels, mcfg, procs, neighbour = cfg.concurrency, cfg.measure, cfg.client_procs, cfg.neighbour
    import tritonclient.grpc as grpcclient

    from .loadgen import Neighbour, ProcessLoad, Target

    client = grpcclient.InferenceServerClient(url)  # the server's statistics only
    snap = lambda: stats_snapshot(client.get_inference_statistics(case.triton_model, as_json=True),  # noqa: E731
                                  case.triton_model)
    out = {}
    try:
        with ProcessLoad([Target(url, case.triton_model, feeds)], max(levels), procs) as load, \
                (Neighbour() if neighbour else contextlib.nullcontext()) as nb:
            for n in levels:
                alone = _neighbour_alone(nb, mcfg) if nb else None  # just before each level: load drifts
                since = nb.mark() if nb else None
                m, snaps = load.measure(n, 1, mcfg, snap)
                out[str(n)] = entry = _sweep_entry(m, snaps, label, n, log)
                if nb:
                    entry["neighbour"] = _neighbour_entry(nb.rate(since), alone)
                    log(f"  {'':22s}        neighbour (1-thread GEMM) at {entry['neighbour']['gflops_per_s']:.1f} "
                        f"GFLOP/s, {entry['neighbour']['fraction_of_alone']:.2f} of its rate beside an idle server")
    finally:
        client.close()
    return out


def _neighbour_alone(nb, mcfg: MeasureConfig) -> float:
    """The neighbour's rate with the server idle (client processes started, none sending)."""
    since = nb.mark()
    time.sleep(max(1.0, 3 * mcfg.window_s))
    return nb.rate(since)


def _neighbour_entry(gflops: float, alone: float) -> dict[str, float]:
    return {"gflops_per_s": gflops, "alone_gflops_per_s": alone, "fraction_of_alone": gflops / alone}


def bench_sweep(cfg: BenchConfig, case: Case, server, plain, specs, label: str, log) -> dict:
    """Closed-loop gRPC clients sending batch-1 requests to one graph model: one process each (cfg.load
    "processes"), or coroutines in this process ("async", the bench's first method)."""
    import tritonclient.grpc as grpcclient

    from biva_export.onnx_export import example_inputs

    spec = specs[case.graph]
    make = lambda rows, seed: example_inputs(spec, plain, rows, seed)  # noqa: E731
    if cfg.load == "async":
        bodies = triton_inputs(grpcclient, case, make, 1, cfg.seed + 7)
        return asyncio.run(_sweep_async(server.grpc_url, case, bodies, cfg.concurrency, cfg.measure, log, label))
    return _sweep_processes(server.grpc_url, case, request_feeds(case, make, 1, cfg.seed + 7), cfg, log, label)


def bench_api_sweep(cfg: BenchConfig, repo: Path, run: "_Servers") -> dict:
    """The API sweep: closed-loop clients (loadgen.ProcessLoad, cfg.api_client_procs processes) send the API
    models' requests (backends.api_loads) through the fronts of `tritonserver` as users start it, over each of
    cfg.api_protocols, at each of cfg.concurrency clients; Triton's statistics (through the gRPC front) of the API
    model and the graph models it calls over the reported windows."""
    import tritonclient.grpc as grpcclient

    from biva_export.onnx_export import example_inputs

    from .loadgen import ProcessLoad, Target

    log, levels = run.log, cfg.concurrency
    detect = (repo / DETECT / "config.pbtxt").is_file()
    loads = api_loads(make_cases(cfg.iw, read_meta(repo).n_layers), cfg.api_score_images, cfg.api_sample_n, detect)
    spec = run.specs[SCORER]
    make = lambda rows, seed: example_inputs(spec, run.plain, rows, seed)  # noqa: E731
    out: dict[str, Any] = {"server": "tritonserver as users start it: the HTTP and gRPC fronts, the supervisor",
                           "protocols": list(cfg.api_protocols), "levels": list(levels),
                           "client_processes": cfg.api_client_procs, "loads": {}}
    if not detect:
        out["note"] = "the repository has no biva_detect (no CKPT.detector.json at export): not measured"
    log("Triton as users start it (fronts on), API requests:")
    with _server(repo, run.out_dir / "server_api.log", direct=False) as server:
        urls = {"grpc": server.grpc_url, "http": server.http_url}
        cells = [(load, proto) for load in loads for proto in cfg.api_protocols]
        targets = [Target(urls[proto], load.model, api_load_feeds(load, make, cfg.seed + 11), proto, load.outputs)
                   for load, proto in cells]
        client = grpcclient.InferenceServerClient(server.grpc_url)  # the statistics, through the gRPC front
        try:
            out["tritonserver"] = _server_version(client)
            with ProcessLoad(targets, max(levels), cfg.api_client_procs) as pl:
                for i, (load, proto) in enumerate(cells):
                    models = (load.model, *FRONT_GRAPHS[load.model])
                    snap = lambda models=models: {  # noqa: E731
                        **{m: stats_snapshot(client.get_inference_statistics(m, as_json=True), m) for m in models},
                        CPU_KEY: tree_cpu(server.process.pid)}
                    entry = out["loads"].setdefault(load.name, {
                        "model": load.model, "images_per_request": load.images, "ceiling_case": load.case.name,
                        "graphs": list(FRONT_GRAPHS[load.model])})
                    for n in levels:
                        m, snaps = pl.measure(n, load.images, cfg.measure, snap, target=i)
                        cell = m.to_dict()
                        before, after = snaps[max(0, len(snaps) - 4)], snaps[-1]
                        cell["server"] = {model: stats_delta(before[model], after[model]) for model in models}
                        cell["cpu"] = cpu_per_request(before[CPU_KEY], after[CPU_KEY],
                                                      cell["server"][load.model].get("requests", 0))
                        client_us = (cell.get("load") or {}).get("client_cpu_us_per_call")
                        if cell["cpu"] and client_us is not None:
                            cell["cpu"]["clients_ms"] = client_us / 1e3
                        entry.setdefault(proto, {})[str(n)] = cell
                        log(_api_line(load.name, proto, n, cell, models))
        finally:
            client.close()
    return out


def _api_line(name: str, proto: str, n: int, cell: dict, models: tuple[str, ...]) -> str:
    front, graph = cell["server"].get(models[0], {}), cell["server"].get(models[-1], {})
    lat = cell["latency_ms"]
    return (f"  {name:12s} {proto:4s} c={n:<3d} {cell['images_per_s']:9.1f} img/s  p50 {lat['p50']:8.2f}  p99 "
            f"{lat['p99']:8.2f} ms  busy/call {cell['load'].get('busy_per_call') or 0:.2f}  front queue "
            f"{front.get('queue_us', 0):7.0f} compute {front.get('compute_infer_us', 0):7.0f} us  graph queue "
            f"{graph.get('queue_us', 0):7.0f} compute {graph.get('compute_infer_us', 0):7.0f} us  batch "
            f"{graph.get('mean_batch_rows', 0):.1f}{'' if cell['stable'] else '  (not stable)'}"
            + (f"\n  {'':12s} {'':4s}        server CPU {cpu['server_ms']:.2f} ms/request (fronts "
               f"{cpu['fronts_ms']:.2f}, tritonserver {cpu['tritonserver_ms']:.2f}, API stubs {cpu['api_stubs_ms']:.2f}"
               f", graph stubs {cpu['graph_stubs_ms']:.2f}), {cpu['server_cores']:.2f} cores busy"
               if (cpu := cell.get("cpu")) else ""))


def _graph_flops(graph: str, path: Path, plain, spec, samples: int, ks: int) -> dict[str, Any]:
    """FLOPs per image of one graph call with `samples` samples and `ks` values of k per image (where the graph
    has those axes), counted on the ONNX graph and on the PyTorch module."""
    from biva_export.graphs import GRAPH_MODULES
    from biva_export.onnx_export import example_inputs

    ex = example_inputs(spec, plain, 4, seed=1, samples=samples, ks=ks)
    module = GRAPH_MODULES[graph](plain).eval()
    return {"onnx": onnx_flops_per_row(path, {SAMPLES: samples, KS: ks}),
            "torch": torch_flops_per_row(module, tuple(torch.from_numpy(ex[n]) for n in spec.input_names))}


def _flops(cases: dict[str, Case], graphs: dict[str, Path], plain, specs, graph_max: int) -> dict[str, dict]:
    """FLOPs per image of each case: one graph row, or for K > 1 the scorer calls biva_score makes for one
    image (the stages that see x alone once per call), with K encoder rows (every sample through the whole
    pass, biva_score's first route) beside them."""
    counts: dict[tuple[str, int, int], dict] = {}

    def count(g: str, samples: int = 1, ks: int = 1) -> dict:
        if (g, samples, ks) not in counts:
            counts[g, samples, ks] = _graph_flops(g, graphs[g], plain, specs[g], samples, ks)
        return counts[g, samples, ks]

    out = {}
    for name, c in cases.items():
        calls = [count(c.graph)] if c.score is None else \
            [count(c.graph, drw.stop - drw.start, len(c.score.ks) if block.with_ks else 0)
             for block, plan in score_plan(c.score, 1, graph_max) for _, drw in plan]
        onnx_total, torch_total = sum(f["onnx"]["total"] for f in calls), sum(f["torch"] for f in calls)
        complete = all(f["onnx"]["complete"] for f in calls)
        by_op: dict[str, int] = {}
        for f in calls:
            for op, v in f["onnx"]["by_op"].items():
                by_op[op] = by_op.get(op, 0) + v
        out[name] = {"graph": c.graph, "rows_per_image": c.rows_per_image,
                     "flops_per_row_onnx": onnx_total / c.rows_per_image, "flops_per_row_onnx_by_op": by_op,
                     "onnx_count_complete": complete, "flops_per_row_torch": torch_total / c.rows_per_image,
                     "flops_per_image": onnx_total if complete else torch_total,
                     "source": "onnx" if complete else "torch"}
        if c.encoder_rows_flops:
            enc = count(ENCODER)
            out[name]["flops_per_image_encoder_rows"] = c.rows_per_image * (
                enc["onnx"]["total"] if enc["onnx"]["complete"] else enc["torch"])
    return out


def _new_result(ckpt: Path, cfg: BenchConfig) -> dict[str, Any]:
    result: dict[str, Any] = {"meta": {"mode": cfg.mode, "checkpoint": str(ckpt), "config": asdict(cfg),
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "system": system_info(cfg.threads)}, "notes": []}
    load = os.getloadavg()[0]
    if load > 0.5 * len(os.sched_getaffinity(0)):
        result["notes"].append(f"the machine was busy at the start (load average {load:.1f} for "
                               f"{len(os.sched_getaffinity(0))} cores): figures are not representative")
    return result


def _describe(result: dict, cfg: BenchConfig, cases: dict[str, Case], graph_max: int) -> None:
    result["notes"].append("FLOPs per image: the ONNX count (Conv, ConvTranspose, MatMul, Gemm; 2 per "
                           "multiply-add) where shape inference gave every shape; it leaves out work the "
                           "exporter pruned (the encoder's unused p(x|z) head), which the PyTorch count includes.")
    result["graphs"] = {n: {"graph": c.graph, "triton_model": c.triton_model, "rows_per_image": c.rows_per_image,
                            "batches": list(_batches(cfg, c)), "results": {}} for n, c in cases.items()}
    for c in (c for c in cases.values() if c.encoder_rows_flops):
        result["notes"].append(
            f"{c.name}: K = {c.rows_per_image} importance samples per image, batches {list(_batches(cfg, c))}; in "
            "process "
            f"the scorer graph runs them in the calls biva_score makes (at most {min(IW_CALL_ROWS, graph_max)} "
            "rows of images x samples each, the stages that see x alone once per image and call, the calls "
            "holding sample 0 with its L^{>k} pass for k = 0); Triton gets one biva_score request with iw = K. "
            "Its FLOPs per image are those calls'; flops_per_image_encoder_rows is K encoder rows, every sample "
            "through the whole pass (the route before).")


def _finish(result: dict, cfg: BenchConfig, gemm: tuple[dict, dict], out_dir: Path, t_start: float) -> None:
    result["gemm"] = {"start": gemm[0], "end": gemm[1], T.n: cfg.gemm_n, "threads": cfg.threads,
                      "gflops_per_s": (gemm[0]["gflops_per_s"] + gemm[1]["gflops_per_s"]) / 2}
    add_achieved(result)
    result["meta"]["unstable_cells"] = _unstable(result)
    result["ratios"] = compute_ratios(result)
    result["meta"]["duration_s"] = time.time() - t_start
    result["meta"]["system"]["load_average_at_end"] = list(os.getloadavg())
    write_outputs(result, out_dir)


def run_bench(ckpt: Path, out_dir: Path, cfg: BenchConfig, repo: Path | None = None,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run every measurement, write bench.json, bench.md and the plots to `out_dir`; returns the result."""
    from biva_core.checkpoint import load_model
    from biva_export.graphs import graph_specs, inference_copy

    t_start = time.time()
    if repo is not None:
        _check_repo(repo, ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    result = _new_result(ckpt, cfg)
    gemm_start = gemm_rate(cfg.gemm_n, cfg.threads, cfg.gemm_reps)
    log(f"GEMM {cfg.gemm_n}^3, {cfg.threads} threads: {gemm_start['gflops_per_s']:.1f} GFLOP/s")

    model, _ = load_model(ckpt)
    plain = inference_copy(model)
    specs = graph_specs(plain)
    cases = {n: c for n, c in make_cases(cfg.iw, model.cfg.n_layers).items() if n in cfg.cases}
    with tempfile.TemporaryDirectory(prefix="biva-bench-") as tmp:
        work = Path(tmp)
        if repo is None:
            from biva_export.pipeline import run_export

            repo = work / "repo"
            log("exporting the checkpoint (pass --repo to reuse an exported repository) ...")
            run_export(ckpt, repo, log=lambda *_: None)
        result["meta"]["repository"] = str(repo) if repo.parent != work else "exported into a temporary folder"
        result["flops"] = _flops(cases, _graph_files(repo, specs), plain, specs, read_meta(repo).graph_max_batch)
        _describe(result, cfg, cases, read_meta(repo).graph_max_batch)
        log("in process (no server running):")
        result["meta"]["ort_session_load_s"], served = bench_inprocess(cfg, cases, repo, plain, specs,
                                                                       result["graphs"], work, log)
        servers = _Servers(work, out_dir, plain, specs, log, served)
        if any(b.startswith("triton") for b in cfg.backends) or "graph" in cfg.sweeps:
            _bench_servers(cfg, cases, repo, servers, result)
        if "api" in cfg.sweeps:
            result["api_sweep"] = bench_api_sweep(cfg, repo, servers)
            result["meta"]["system"]["versions"].setdefault("tritonserver", result["api_sweep"]["tritonserver"])
        gemm_end = gemm_rate(cfg.gemm_n, cfg.threads, cfg.gemm_reps)
    log(f"GEMM at the end: {gemm_end['gflops_per_s']:.1f} GFLOP/s")
    _finish(result, cfg, (gemm_start, gemm_end), out_dir, t_start)
    for key in ("dynamic_batching_scaling", "dynamic_batching_of_ceiling"):
        x = result["ratios"][key]
        if x["value"] is not None:
            why = f"; above 1: {x['why_above_1']}" if "why_above_1" in x else ""
            log(f"{x['what']}: {x['value']:.2f} (target {x['target']}){why}")
    for name, per in result["ratios"].get("api_of_ceiling", {}).items():
        for proto, x in per.items():
            if x["value"] is not None:
                log(f"{name} over {proto}: {x['what']}: {x['value']:.2f} (target {x['target']})")
    for layout, per in result["ratios"]["dynamic_batching_layouts"].items():
        scaling, of_ceiling = ("-" if per[k]["value"] is None else f"{per[k]['value']:.2f}"
                               for k in ("scaling", "of_ceiling"))  # no 1-client level: no scaling
        log(f"layout {layout}: {scaling}x of 1 client, {of_ceiling} of the ceiling")
    log(f"wrote {out_dir / RESULT}, {out_dir / 'bench.md'} and plots")
    return result


def _unstable(result: dict) -> list[str]:
    """Cells that did not stabilise within the window cap (their figures pool the last 3 windows anyway)."""
    out = [f"{case}/{backend}/b{b}" for case, e in result["graphs"].items() for backend, cells in e["results"].items()
           for b, m in cells.items() if m.get("stable") is False]
    conc = result.get("concurrency", {})
    sweeps = {k: conc[k] for k in ("dynamic_batching", "no_dynamic_batching") if k in conc}
    sweeps |= {f"layouts/{k}": v["sweep"] for k, v in conc.get("layouts", {}).items()}
    for key, runs in sweeps.items():
        out += [f"concurrency/{key}/c{n}" for n, m in runs.items() if m.get("stable") is False]
    for name, load in result.get("api_sweep", {}).get("loads", {}).items():
        out += [f"api_sweep/{name}/{proto}/c{n}" for proto in result["api_sweep"]["protocols"]
                for n, m in load.get(proto, {}).items() if m.get("stable") is False]
    return out


def _bench_servers(cfg: BenchConfig, cases: dict[str, Case], repo: Path, run: _Servers, result: dict) -> None:
    work, out_dir, plain, specs, log = run.work, run.out_dir, run.plain, run.specs, run.log
    # each instance gets the bench's threads shared out between the graph's instances, as exported
    instances = cfg.variant.instances or exported_instances(repo)
    variant = cfg.variant if cfg.variant.threads else Variant(
        **{**asdict(cfg.variant), "threads": max(1, cfg.threads // instances)})
    sweep_case = make_cases(cfg.iw, read_meta(repo).n_layers)[cfg.sweep_case]
    api = {api_case(c).triton_model for c in cases.values() if c.score is None} \
        if "triton_grpc_api" in cfg.backends else set()
    models = sorted({c.triton_model for c in cases.values()} | {sweep_case.triton_model} | api)
    on = write_variant(repo, work / "repo_dynamic", models, variant)
    result["meta"]["triton_variant"] = asdict(variant)
    result["meta"]["triton_configs"] = {m: (on / m / "config.pbtxt").read_text() for m in models}
    graph_sweep = "graph" in cfg.sweeps
    if graph_sweep:
        result["concurrency"] = {"case": sweep_case.name, "model": sweep_case.triton_model, "protocol": "grpc",
                                 "request_batch": 1, "levels": list(cfg.concurrency),
                                 "path": "direct to the graph model (tritonserver --biva-direct, no fronts)"}
    log("Triton (--biva-direct), dynamic batching on:")
    with _server(on, out_dir / "server_dynamic.log") as server:
        if any(b.startswith("triton") for b in cfg.backends):
            version = bench_triton_sync(cfg, cases, server, on, run, result["graphs"])
            result["meta"]["system"]["versions"]["tritonserver"] = version
        if graph_sweep:
            result["concurrency"]["dynamic_batching"] = bench_sweep(cfg, sweep_case, server, plain, specs,
                                                                    "dynamic batching on", log)
    if not graph_sweep:
        return
    off = write_variant(repo, work / "repo_plain", [sweep_case.triton_model],
                        Variant(**{**asdict(variant), "dynamic_batching": False}))
    log("Triton (--biva-direct), dynamic batching off:")
    with _server(off, out_dir / "server_plain.log") as server:
        result["concurrency"]["no_dynamic_batching"] = bench_sweep(cfg, sweep_case, server, plain, specs,
                                                                   "dynamic batching off", log)
    if cfg.layouts:
        result["concurrency"]["layouts"] = _bench_layouts(cfg, sweep_case, repo, variant, run)
    load = (("one process per client" if not cfg.client_procs else f"at most {cfg.client_procs} processes, "
             "clients spread over them as coroutines") + " (tritonclient.grpc.aio)" if cfg.load == "processes"
            else "coroutines of the bench process (tritonclient.grpc.aio)")
    result["notes"].append("The dynamic-batching ceiling is the best in-process rate of the sweep's graph on what "
                           "the graph models run (ONNX Runtime with its default thread spinning, or the served "
                           "route when measured; one caller); the served graphs run "
                           f"with spinning {_spin_word(variant.spinning)} unless a layout says otherwise.")
    result["notes"].append(f"Triton clients (python tritonclient) run on the same cores as the server; the graph "
                           f"sweep's clients: {load}. The per-case cells and the graph sweep run with "
                           "--biva-direct: Triton's own endpoints, without the fronts (python -m "
                           "studies.front_latency measures what the fronts add); the API sweep goes through them.")


def _spin_word(spinning: bool | None) -> str:
    return "as exported" if spinning is None else ("on" if spinning else "off")


@dataclass(frozen=True)
class _Servers:
    """What every server of a bench run shares: folders for variants and logs, the model and its specs, the log."""

    work: Path  # variant repositories
    out_dir: Path  # server logs
    plain: Any  # the inference copy of the model
    specs: dict
    log: Callable[[str], Any]
    served_calls: dict = field(default_factory=dict)  # (case, batch) -> the in-process served route's call(i)


def _bench_layouts(cfg: BenchConfig, case: Case, repo: Path, base: Variant, run: _Servers) -> dict:
    """The dynamic-batching sweep again for each --layouts entry (instances x threads, spinning), one server
    each, everything else as the main variant; with layout_rounds R, the list R times over, interleaved so
    that a change of background load falls on every layout alike. Each layout's `sweep` is its round with
    the median images/s at the highest level; every round is kept under `rounds`."""
    work, out_dir, plain, specs, log = run.work, run.out_dir, run.plain, run.specs, run.log
    variants = [Variant(**{**asdict(base), "instances": v.instances, "threads": v.threads,
                           "spinning": base.spinning if v.spinning is None else v.spinning}) for v in cfg.layouts]
    rounds: dict[str, list[dict]] = {v.layout: [] for v in variants}
    top = str(max(cfg.concurrency))
    for r in range(cfg.layout_rounds):
        for v in variants:
            name = v.layout.replace(":", "_")
            path = write_variant(repo, work / f"repo_layout_{name}", [case.triton_model], v)
            log(f"Triton, dynamic batching on, layout {v.layout}" + (f", round {r + 1}:" if cfg.layout_rounds > 1
                                                                      else ":"))
            with _server(path, out_dir / f"server_layout_{name}.log") as server:
                rounds[v.layout].append(bench_sweep(cfg, case, server, plain, specs, f"layout {v.layout}", log))
    out = {}
    for v in variants:
        runs = sorted(rounds[v.layout], key=lambda sweep: sweep[top]["images_per_s"])
        out[v.layout] = {"variant": asdict(v), "sweep": runs[(len(runs) - 1) // 2], "rounds": rounds[v.layout]}
    return out
