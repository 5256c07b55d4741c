"""Turning measurements into the figures that matter: achieved fraction of the GEMM rate, ratios against
the targets, and the JSON, markdown and PNG outputs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .config import ALTERNATED_API

BACKEND_LABELS = {"torch": "PyTorch", "compile": "torch.compile", "ort": "ONNX Runtime", "triton_http": "Triton HTTP",
                  "triton_grpc": "Triton gRPC", "ort_elu_native": "ONNX Runtime, Elu nodes",
                  "aoti": "AOTInductor package", "served": "served route (in process)",
                  "triton_grpc_api": "Triton gRPC, API model"}

# (numerator backend, denominator backend, batch, target)
ORT_OVER_TORCH = ((1, 1.5), (64, 1.2))
ORT_OVER_COMPILE = ((1, 1.0), (64, 1.0))  # ONNX Runtime at least as fast as torch.compile
ELU_DECOMPOSITION = ((1, 1.0), (64, 1.0))  # the served graph's ELU form at least as fast as the Elu node
AOTI_OVER_COMPILE = ((1, 1.0), (64, 1.0))  # the compiled serving route at least as fast as torch.compile
GRPC_OVER_ORT = (64, 0.85)
SERVED_OVER_COMPILE = ((1, 1.0), (64, 0.95))  # the served default route against torch.compile, in process
GRPC_OVER_SERVED = (64, 0.85)  # Triton gRPC against the same route in process (the graph model, and the API model)
DYNAMIC_BATCHING = (16, 1, 4.0)  # clients, against clients, target
CEILING_FRACTION = 0.90  # 16 clients' images/s >= 90% of the ceiling (best in-process rate, CEILING_BACKENDS)
CEILING_BACKENDS = ("ort", "served")  # what the graph models run: ONNX Runtime, or the served route when measured
API_CLIENTS = 16  # the API sweep's level whose images/s are held against the ceiling (CEILING_FRACTION)
PEAK_FRACTION = ("scorer_k1", 64, 0.40)
IW_PEAK_FRACTION = ("scorer_iw", 1, 0.70)  # the IW likelihood (K = 1000), batch 1, >= 70% of the GEMM rate


def add_achieved(result: dict[str, Any]) -> None:
    """GFLOP/s and fraction of the measured GEMM rate, on every measured cell."""
    peak = result["gemm"]["gflops_per_s"]
    for case, entry in result["graphs"].items():
        flops = result["flops"][case]["flops_per_image"]
        rows_flops = result["flops"][case].get("flops_per_image_encoder_rows")  # IW cases: K whole passes
        for cells in entry["results"].values():
            for m in cells.values():
                if "images_per_s" in m:
                    m["gflops_per_s"] = m["images_per_s"] * flops / 1e9
                    m["fraction_of_gemm"] = m["gflops_per_s"] / peak
                    if rows_flops:
                        m["seconds_per_image"] = 1.0 / m["images_per_s"]
                        m["fraction_of_gemm_encoder_rows"] = m["images_per_s"] * rows_flops / 1e9 / peak


def _ips(result: dict, case: str, backend: str, batch: int) -> float | None:
    m = result["graphs"].get(case, {}).get("results", {}).get(backend, {}).get(str(batch), {})
    return m.get("images_per_s")


def _alternated_ratio(result: dict, case: str, batch: str, windowed: dict[str, Any],
                      pair: tuple[str, str] = ("served", "compile"), key: str = "alternated") -> dict[str, Any]:
    """pair[0] / pair[1] from the calls in turn (run._alternated, stored under `key`) where the run made them, with
    the windows' ratio beside it; else the windows' ratio itself."""
    cell = result["graphs"].get(case, {}).get(key, {}).get(batch)
    if not cell:
        return windowed
    ips = cell["images_per_s"]
    what = windowed["what"].rsplit(",", 1)[0]  # "... at batch B"
    settled = ", each turn after 1 untimed call" if cell.get("settle") else ""
    out = _ratio(ips.get(pair[0]), ips.get(pair[1]), windowed["target"],
                 f"{what}, {cell['reps']} rounds of {cell['turn']} alternated calls{settled}")
    return {**out, "windowed": windowed["value"]}


def _ratio(num: float | None, den: float | None, target: float, what: str) -> dict[str, Any]:
    value = num / den if num is not None and den else None
    return {"value": value, "target": target, "met": None if value is None else value >= target, "what": what}


def _graph_ratios(result: dict[str, Any], case: str) -> dict[str, dict]:
    """One graph case's ratios: group -> {batch: ratio}."""
    def pair(num: str, den: str, targets, what: str) -> dict:
        return {str(b): _ratio(_ips(result, case, num, b), _ips(result, case, den, b), t, what.format(b=b))
                for b, t in targets}

    windowed = pair("served", "compile", SERVED_OVER_COMPILE,
                    "served route (in process) / torch.compile images/s at batch {b}, windows")
    out = {"served_over_compile": {b: _alternated_ratio(result, case, b, r) for b, r in windowed.items()},
           "triton_grpc_over_served": pair("triton_grpc", "served", [GRPC_OVER_SERVED],
                                           "Triton gRPC to the graph model / the served route in process, images/s "
                                           "at batch {b}"),
           "triton_grpc_api_over_served": {b: _alternated_ratio(result, case, b, r, ALTERNATED_API, "alternated_api")
                                           for b, r in pair("triton_grpc_api", "served", [GRPC_OVER_SERVED],
                                                            "Triton gRPC to the API model / the served route in "
                                                            "process, images/s at batch {b}, windows").items()},
           "aoti_over_compile": pair("aoti", "compile", AOTI_OVER_COMPILE,
                                     "AOTInductor package / torch.compile images/s at batch {b}"),
           "triton_grpc_over_ort": pair("triton_grpc", "ort", [GRPC_OVER_ORT],
                                        "Triton gRPC / ONNX Runtime images/s at batch {b}")}
    for group, peer, label, targets in (("ort_over_torch", "torch", "PyTorch", ORT_OVER_TORCH),
                                        ("ort_over_compile", "compile", "torch.compile", ORT_OVER_COMPILE),
                                        ("ort_over_elu_native", "ort_elu_native", "ONNX Runtime with Elu nodes",
                                         ELU_DECOMPOSITION)):
        out[group] = pair("ort", peer, targets, f"ONNX Runtime / {label} images/s at batch {{b}}")
    return out


def _batching_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The concurrency sweep's scaling and its fraction of the ceiling, per layout measured."""
    hi, lo, t = DYNAMIC_BATCHING
    conc = result.get("concurrency", {})
    sweep = conc.get("dynamic_batching", {})
    one = sweep.get(str(lo), {}).get("images_per_s")
    out = {"dynamic_batching_scaling": _ratio(sweep.get(str(hi), {}).get("images_per_s"), one, t,
                                              f"{hi} clients / {lo} client throughput, dynamic batching on")}
    # Batching can at best reach the best in-process rate over the batches measured: the scaling's ceiling.
    best = ceiling(result, conc.get("case", ""))
    out["dynamic_batching_scaling"]["ceiling"] = best / one if best and one else None
    out["dynamic_batching_of_ceiling"] = _ratio(
        sweep.get(str(hi), {}).get("images_per_s"), best, CEILING_FRACTION,
        f"{hi} clients' images/s / the ceiling (best in-process rate of what the graph models run), dynamic "
        "batching on")
    if (out["dynamic_batching_of_ceiling"]["value"] or 0) > 1.0:
        out["dynamic_batching_of_ceiling"]["why_above_1"] = (
            "the ceiling is one caller's rate over the batches measured; the server runs two instances of one "
            "thread side by side, which on small merged batches does more than one call of two threads, and the "
            "machine's speed drifts between the two measurements")
    out["dynamic_batching_layouts"] = {
        layout: {"scaling": _ratio(run["sweep"].get(str(hi), {}).get("images_per_s"),
                                   run["sweep"].get(str(lo), {}).get("images_per_s"), t,
                                   f"{hi} / {lo} clients, layout {layout}"),
                 "of_ceiling": _ratio(run["sweep"].get(str(hi), {}).get("images_per_s"), best, CEILING_FRACTION,
                                      f"{hi} clients / the ceiling, layout {layout}")}
        for layout, run in conc.get("layouts", {}).items()}
    return out


def _api_cpu_lines(sweep: dict[str, Any]) -> list[str]:
    """Where each API cell's CPU went (bench/cpu.py), per request: when every core is busy, the server's sum plus
    the clients' bounds the rate at cores / (CPU seconds per request)."""
    rows = [(name, proto, n, m["cpu"]) for name, load in sweep["loads"].items() for proto in sweep["protocols"]
            for n, m in load.get(proto, {}).items() if m.get("cpu")]
    if not rows:
        return []
    lines = ["", "CPU per request over the same windows (ms; /proc of the server's processes and the client "
             "processes' own accounting): the launcher (HTTP and gRPC fronts, supervisor, validation worker), "
             "tritonserver, the API models' stubs, the graph models' stubs; cores = the server's CPU seconds per "
             "second.", "",
             "| request | protocol | clients | server ms | fronts | tritonserver | API stubs | graph stubs | clients "
             "| server cores |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, proto, n, c in rows:
        lines.append(f"| {name} | {proto} | {n} | {c['server_ms']:.2f} | {c['fronts_ms']:.2f} | "
                     f"{c['tritonserver_ms']:.2f} | {c['api_stubs_ms']:.2f} | {c['graph_stubs_ms']:.2f} | "
                     f"{_fmt(c.get('clients_ms'), '.2f')} | {c['server_cores']:.2f} |")
    return lines


def ceiling(result: dict[str, Any], case: str) -> float | None:
    """The best in-process images/s of `case` on what the graph models run (CEILING_BACKENDS), over its batches."""
    measured = result["graphs"].get(case, {}).get("results", {})
    return max((m["images_per_s"] for b in CEILING_BACKENDS for m in measured.get(b, {}).values()
                if "images_per_s" in m), default=None)


def _api_ratios(result: dict[str, Any]) -> dict[str, dict]:
    """Each API request's images/s at API_CLIENTS clients over its ceiling (the best in-process rate of its case),
    per protocol."""
    sweep = result.get("api_sweep", {})
    out = {}
    for name, load in sweep.get("loads", {}).items():
        best = ceiling(result, load["ceiling_case"])
        out[name] = {proto: {**_ratio(load.get(proto, {}).get(str(API_CLIENTS), {}).get("images_per_s"), best,
                                      CEILING_FRACTION,
                                      f"{load['model']}, {load['images_per_request']} image(s) per request, "
                                      f"{API_CLIENTS} {proto} clients through the fronts / the ceiling "
                                      f"({load['ceiling_case']} in process)"), "ceiling": best}
                     for proto in sweep["protocols"]}
    return out


def _scorer_peak_fraction(result: dict[str, Any]) -> dict[str, Any]:
    """The scorer's GFLOP/s over the GEMM rate at the target batch, best backend."""
    case, b, t = PEAK_FRACTION
    by_backend = {}
    for backend in BACKEND_LABELS:
        m = result["graphs"].get(case, {}).get("results", {}).get(backend, {}).get(str(b), {})
        if "fraction_of_gemm" in m:
            by_backend[backend] = m["fraction_of_gemm"]
    best = max(by_backend, key=by_backend.get) if by_backend else None
    return {**_ratio(by_backend.get(best), 1.0, t, f"scorer batch-{b} GFLOP/s / fp32 GEMM rate, best backend"),
            "backend": best, "by_backend": by_backend}


def compute_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The targets, each {value, target, met, what}; value None where the numbers were not measured."""
    graph_cases = [c for c in result["graphs"] if result["graphs"][c]["rows_per_image"] == 1]
    per_case = {case: _graph_ratios(result, case) for case in graph_cases}
    groups = ("ort_over_torch", "ort_over_compile", "ort_over_elu_native", "aoti_over_compile",
              "triton_grpc_over_ort", "served_over_compile", "triton_grpc_over_served", "triton_grpc_api_over_served")
    ratios: dict[str, Any] = {g: {case: per_case[case][g] for case in graph_cases} for g in groups}
    ratios.update(_batching_ratios(result))
    ratios["api_of_ceiling"] = _api_ratios(result)
    ratios["scorer_peak_fraction"] = _scorer_peak_fraction(result)
    ratios["iw_peak_fraction"] = _iw_peak_fraction(result)
    return ratios


def _iw_peak_fraction(result: dict[str, Any]) -> dict[str, Any]:
    """The IW likelihood's executed GFLOP/s over the GEMM rate (best backend), with its seconds per image and the
    fraction K whole encoder passes per image would be at the same speed, per backend."""
    case, b, t = IW_PEAK_FRACTION
    cells = {be: m for be, cells in result["graphs"].get(case, {}).get("results", {}).items()
             for key, m in cells.items() if key == str(b) and "fraction_of_gemm" in m}
    by_backend = {be: m["fraction_of_gemm"] for be, m in cells.items()}
    best = max(by_backend, key=by_backend.get) if by_backend else None
    k = result["graphs"].get(case, {}).get("rows_per_image")
    return {**_ratio(by_backend.get(best), 1.0, t, f"IW likelihood (K = {k}, batch {b}) executed GFLOP/s / fp32 "
                                                   "GEMM rate, best backend"),
            "backend": best, "by_backend": by_backend,
            "seconds_per_image": {be: m["seconds_per_image"] for be, m in cells.items()},
            "encoder_rows_by_backend": {be: m.get("fraction_of_gemm_encoder_rows") for be, m in cells.items()}}


# ---- outputs --------------------------------------------------------------------------------------

def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _met(r: dict) -> str:
    return "-" if r["met"] is None else ("yes" if r["met"] else "no")


def compile_summary(compile_s: dict[str, float]) -> str:
    """torch.compile's first call per graph row count (compiling; left out of every timed figure)."""
    return "torch.compile: compiling took " + ", ".join(f"{s:.1f} s ({rows} rows)" for rows, s in compile_s.items()) \
        + ", not timed"


def markdown(result: dict[str, Any]) -> str:
    meta, sysinfo = result["meta"], result["meta"]["system"]
    v = sysinfo["versions"]
    lines = [f"# BIVA serving benchmark ({meta['mode']})", "",
             f"{sysinfo['cpu_model']}, {sysinfo['cpus_usable']} cores usable, {sysinfo['threads']} intra-op "
             f"threads everywhere; torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, Triton "
             f"{v.get('tritonserver', '-')}; fp32 GEMM {result['gemm']['n']}^3: "
             f"{result['gemm']['gflops_per_s']:.1f} GFLOP/s (start {result['gemm']['start']['gflops_per_s']:.1f}, "
             f"end {result['gemm']['end']['gflops_per_s']:.1f}). Checkpoint `{meta['checkpoint']}`.", ""]
    lines += ["## Throughput and latency per graph", "",
              "images/s (p50 / p99 latency in ms); * = not stable within the window cap", ""]
    for case, entry in result["graphs"].items():
        backends = [b for b in BACKEND_LABELS if b in entry["results"]]
        f = result["flops"][case]
        lines += [f"### {case} (graph {entry['graph']}, {entry['rows_per_image']} rows per image, "
                  f"{f['flops_per_image'] / 1e6:.1f} MFLOP per image)", "",
                  "| batch | " + " | ".join(BACKEND_LABELS[b] for b in backends) + " |",
                  "|---:|" + "---:|" * len(backends)]
        for b in entry["batches"]:
            cells = []
            for be in backends:
                m = entry["results"][be].get(str(b), {})
                if "images_per_s" not in m:
                    cells.append("skipped" if "skipped" in m else "-")
                    continue
                lat = m["latency_ms"]
                cells.append(f"{m['images_per_s']:.1f} ({lat['p50']:.2f} / {lat['p99']:.2f})"
                             f"{'' if m['stable'] else '*'}")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        turns = [(b, c) for key in ("alternated", "alternated_api") for b, c in entry.get(key, {}).items()]
        if turns:
            lines += ["", "In turn (median per call, the same stretch of time for both): " + "; ".join(
                f"batch {b}: " + ", ".join(f"{BACKEND_LABELS[be]} {v:.1f}" for be, v in c["images_per_s"].items())
                + f" images/s ({c['reps']} rounds of {c['turn']}{', after 1 untimed' if c.get('settle') else ''})"
                for b, c in turns) + "."]
        if entry.get("compile_s"):
            lines += ["", compile_summary(entry["compile_s"])]
        lines.append("")
    lines += _api_lines(result) + _concurrency_lines(result.get("concurrency")) + _limit_and_target_lines(result)
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def _api_lines(result: dict[str, Any]) -> list[str]:
    """The API sweep: each request through the fronts, per protocol and clients, with Triton's view of it."""
    sweep = result.get("api_sweep")
    if not sweep:
        return []
    lines = [f"## API sweep: requests through the fronts ({sweep['server']})", "",
             "Closed-loop clients in "
             f"{sweep['client_processes'] or 'one process each'} client processes; a busy answer is sent again "
             "after its Retry-After, as biva_client does (latency from the first try; busy = busy answers per "
             "request). Triton's statistics per request over the reported windows: the API model's queue and "
             "compute (its whole execution, the graph calls included), the graph model's queue, compute and the "
             "mean rows per execution (inference_count / execution_count). Ceiling: the best in-process rate of "
             "the request's case on what the graph models run.", "",
             "| request | protocol | clients | images/s | of ceiling | p50 ms | p90 ms | p99 ms | busy | API queue us "
             "| API compute us | graph queue us | graph compute us | graph calls / request | graph mean batch |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, load in sweep["loads"].items():
        best = ceiling(result, load["ceiling_case"])
        api, graph = load["model"], load["graphs"][-1]
        for proto in sweep["protocols"]:
            for n, m in load.get(proto, {}).items():
                s, g, lat = m["server"].get(api, {}), m["server"].get(graph, {}), m["latency_ms"]
                per = g.get("requests", 0) / s["requests"] if s.get("requests") else None
                of = m["images_per_s"] / best if best else None
                lines.append(
                    f"| {name} | {proto} | {n} | {m['images_per_s']:.1f}{'' if m['stable'] else '*'} | "
                    f"{_fmt(of, '.2f')} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | "
                    f"{_fmt((m.get('load') or {}).get('busy_per_call'), '.2f')} | "
                    f"{_fmt(s.get('queue_us'), '.0f')} | {_fmt(s.get('compute_infer_us'), '.0f')} | "
                    f"{_fmt(g.get('queue_us'), '.0f')} | {_fmt(g.get('compute_infer_us'), '.0f')} | "
                    f"{_fmt(per, '.1f')} | {_fmt(g.get('mean_batch_rows'), '.1f')} |")
    lines += _api_cpu_lines(sweep)
    ceilings = {load["ceiling_case"]: ceiling(result, load["ceiling_case"]) for load in sweep["loads"].values()}
    lines += ["", "Ceilings: " + ", ".join(f"{c} {_fmt(v)} images/s" for c, v in ceilings.items()) + "."]
    if sweep.get("note"):
        lines += ["", sweep["note"] + "."]
    return lines + [""]


def _concurrency_lines(conc: dict | None) -> list[str]:
    if not conc:
        return []
    lines = [f"## Concurrency sweep: {conc['model']} over gRPC, batch-1 requests, direct to the graph model "
             "(--biva-direct, no fronts)", "",
             "| clients | dynamic batching | images/s | p50 ms | p90 ms | p99 ms | queue us | compute us | "
             "mean batch |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    sweeps = [(conc.get("dynamic_batching", {}), "on"), (conc.get("no_dynamic_batching", {}), "off")]
    sweeps += [(run["sweep"], f"on, layout {layout}") for layout, run in conc.get("layouts", {}).items()]
    neighbour = any("neighbour" in m for runs, _ in sweeps for m in runs.values())
    if neighbour:  # a 1-thread GEMM process beside the server: its rate against its rate beside an idle server
        lines[2], lines[3] = lines[2] + " neighbour |", lines[3] + "---:|"
    for runs, label in sweeps:
        for n, m in runs.items():
            s, lat = m.get("server", {}), m["latency_ms"]
            lines.append(f"| {n} | {label} | {m['images_per_s']:.1f}{'' if m['stable'] else '*'} | "
                         f"{lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {_fmt(s.get('queue_us'), '.0f')}"
                         f" | {_fmt(s.get('compute_infer_us'), '.0f')} | {_fmt(s.get('mean_batch_rows'), '.1f')} |"
                         + (f" {_fmt(m.get('neighbour', {}).get('fraction_of_alone'), '.2f')} |" if neighbour else ""))
    return lines + [""]


def _limit_and_target_lines(result: dict[str, Any]) -> list[str]:
    lines = ["## Physical limit", "", "| case | MFLOP per image (ONNX) | MFLOP per image (PyTorch) |",
             "|---|---:|---:|"]
    for case, f in result["flops"].items():
        lines.append(f"| {case} | {f['flops_per_row_onnx'] * f['rows_per_image'] / 1e6:.2f} | "
                     f"{f['flops_per_row_torch'] * f['rows_per_image'] / 1e6:.2f} |")
    lines += ["", "## Targets", "", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    r = result["ratios"]
    optional = ("ort_over_elu_native", "aoti_over_compile", "served_over_compile", "triton_grpc_over_served",
                "triton_grpc_api_over_served")
    for group in ("served_over_compile", "triton_grpc_api_over_served", "triton_grpc_over_served", "ort_over_torch",
                  "ort_over_compile", "ort_over_elu_native", "aoti_over_compile", "triton_grpc_over_ort"):
        for case, per in r.get(group, {}).items():
            for b, x in per.items():
                if x["value"] is None and group in optional:
                    continue  # not measured in this run
                also = f" (windows: {_fmt(x['windowed'], '.2f')})" if "windowed" in x else ""
                lines.append(f"| {case}: {x['what']}{also} | {_fmt(x['value'], '.2f')} | {x['target']} | {_met(x)} |")
    for key in ("dynamic_batching_scaling", "dynamic_batching_of_ceiling", "scorer_peak_fraction", "iw_peak_fraction"):
        x = r[key]
        why = f" ({x['why_above_1']})" if x.get("why_above_1") else ""
        lines.append(f"| {x['what']}{why} | {_fmt(x['value'], '.2f')} | {x['target']} | {_met(x)} |")
    for per in r.get("api_of_ceiling", {}).values():
        for x in per.values():
            lines.append(f"| {x['what']} | {_fmt(x['value'], '.2f')} | {x['target']} | {_met(x)} |")
    for per in r.get("dynamic_batching_layouts", {}).values():
        for x in per.values():
            lines.append(f"| {x['what']} | {_fmt(x['value'], '.2f')} | {x['target']} | {_met(x)} |")
    ceiling = r["dynamic_batching_scaling"].get("ceiling")
    if ceiling is not None:
        lines += ["", "Ceiling of the dynamic-batching scaling: the best in-process rate of what the graph models run / "
                      f"the 1-client rate = {ceiling:.2f}x."]
    return lines + _iw_lines(result)


def _iw_lines(result: dict[str, Any]) -> list[str]:
    """Seconds per image and fractions of the GEMM rate of each IW case, per backend and batch."""
    lines = []
    for case, f in result["flops"].items():
        if not f.get("flops_per_image_encoder_rows"):
            continue
        lines += ["", f"## Importance-weighted likelihood ({case}, K = {f['rows_per_image']})", "",
                  f"{f['flops_per_image'] / 1e9:.1f} GFLOP per image executed (the stages that see x alone once "
                  f"per scorer call); K whole encoder passes would be {f['flops_per_image_encoder_rows'] / 1e9:.1f}.",
                  "", "| backend | batch | s per image | executed GFLOP/s | fraction of GEMM | fraction of GEMM, "
                  "counting K whole passes |", "|---|---:|---:|---:|---:|---:|"]
        for backend, cells in result["graphs"][case]["results"].items():
            for b, m in cells.items():
                if "seconds_per_image" in m:
                    lines.append(f"| {BACKEND_LABELS[backend]} | {b} | {m['seconds_per_image']:.3f} | "
                                 f"{m['gflops_per_s']:.1f} | {m['fraction_of_gemm']:.2f} | "
                                 f"{m['fraction_of_gemm_encoder_rows']:.2f} |")
    return lines


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cases = list(result["graphs"])
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        entry = result["graphs"][case]
        for backend, cells in entry["results"].items():
            pts = [(int(b), m["images_per_s"]) for b, m in cells.items() if "images_per_s" in m]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=BACKEND_LABELS[backend])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{case} ({entry['rows_per_image']} rows/image)")
        ax.set_xlabel("images per request")
        ax.set_ylabel("images/s")
        ax.grid(True, which="both", alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # nothing in process measured (an API sweep alone): no legend
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "throughput_vs_batch.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    conc = result.get("concurrency")
    if conc:
        fig, (ax_l, ax_t) = plt.subplots(1, 2, figsize=(9, 3.6))
        for key, label, color in (("dynamic_batching", "dyn. batching", "C0"),
                                  ("no_dynamic_batching", "no batching", "C3")):
            runs = conc.get(key, {})
            if not runs:
                continue
            n = [int(k) for k in runs]
            for p, style in (("p50", "-"), ("p99", "--")):
                ax_l.plot(n, [runs[str(k)]["latency_ms"][p] for k in n], style, color=color, marker="o",
                          label=f"{label} {p}")
            ax_t.plot(n, [runs[str(k)]["images_per_s"] for k in n], color=color, marker="o", label=label)
        for i, (layout, run) in enumerate(conc.get("layouts", {}).items()):
            n = [int(k) for k in run["sweep"]]
            ax_t.plot(n, [run["sweep"][str(k)]["images_per_s"] for k in n], ":", color=f"C{4 + i % 6}",
                      marker=".", label=f"layout {layout}")
        for ax, ylabel in ((ax_l, "latency (ms)"), (ax_t, "images/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients (batch-1 requests)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        ax_l.set_yscale("log")
        fig.suptitle(f"{conc['model']} over gRPC")
        fig.tight_layout()
        paths.append(out_dir / "latency_vs_concurrency.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    result["meta"]["plots"] = [p.name for p in plot(result, out_dir)]
    (out_dir / "bench.md").write_text(markdown(result))
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
