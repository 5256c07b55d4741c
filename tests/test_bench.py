"""biva-bench: the measurement method and the config rewriting (pure, fast), the FLOP counts against
PyTorch's, and one quick end-to-end run on the tiny checkpoint that checks every output is there.
No test asserts a speed."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from biva_bench.measure import MeasureConfig, Window, is_stable, measure_sync
from biva_bench.triton import Variant, parse_layout, stats_delta
from biva_export.serving_config import ServingConfig


def _window(ips: float, p50: float) -> Window:
    return Window(1.0, 10, int(ips), [p50] * 10)


def test_stability_needs_three_windows_within_ten_percent() -> None:
    assert not is_stable([_window(100, 1.0), _window(100, 1.0)], 0.1)
    assert is_stable([_window(50, 9.0), _window(100, 1.0), _window(104, 1.02), _window(97, 0.99)], 0.1)
    assert not is_stable([_window(100, 1.0), _window(100, 1.0), _window(130, 1.0)], 0.1)
    assert not is_stable([_window(100, 1.0), _window(100, 1.0), _window(100, 1.5)], 0.1)  # latency drifts


def test_measure_sync_counts_calls_and_stops_at_the_window_cap() -> None:
    calls = []
    cfg = MeasureConfig(warmup_s=0.0, window_s=0.01, max_windows=5, min_calls=2)
    m, snaps = measure_sync(lambda i: calls.append(i), 4, cfg, boundary=lambda: len(calls))
    assert 3 <= len(m.windows) <= 5
    assert len(snaps) == len(m.windows) + 1 and snaps == sorted(snaps)
    assert m.images_per_s > 0 and m.images_per_call == 4
    assert set(m.latency_ms) == {"p50", "p90", "p95", "p99", "mean"}
    assert calls == list(range(len(calls)))  # the input index rotates


def test_measure_async_counts_every_client() -> None:
    """The bench's default sweep load: coroutine clients; the load record says how it was generated."""
    import asyncio

    from biva_bench.measure import measure_async

    calls = []

    async def call(i: int) -> None:
        calls.append(i)
        await asyncio.sleep(0.001)

    cfg = MeasureConfig(warmup_s=0.0, window_s=0.02, max_windows=4, min_calls=2)
    m, snaps = asyncio.run(measure_async(call, 4, 2, cfg))
    assert m.concurrency == 4 and m.images_per_call == 2 and m.images_per_s > 0
    assert 3 <= len(m.windows) <= 4 and len(snaps) == len(m.windows) + 1
    assert {i % 4 for i in calls} == {0, 1, 2, 3}  # every client called, each rotating its own inputs
    assert m.load["generator"] == "asyncio" and m.load["client_cpu_us_per_call"] > 0


def test_variants_override_only_what_they_set() -> None:
    sc = ServingConfig(max_batch=64, instances=2, threads=1, preferred=(64,), queue_delay_us=2000)
    off = Variant(dynamic_batching=False, threads=2, instances=3).over(sc)
    assert (off.dynamic_batching, off.threads, off.instances, off.preferred, off.max_batch) == (False, 2, 3, (64,), 64)
    tuned = Variant(preferred=(), queue_delay_us=100).over(sc)
    assert tuned.preferred == () and tuned.queue_delay_us == 100 and tuned.graph_queue == sc.graph_queue
    assert Variant().over(sc) == sc
    assert Variant(spinning=True).over(sc).spinning is True and Variant(spinning=False).over(sc).spinning is False


def test_variant_repositories_are_written_by_the_repository_writer(tmp_path: Path, tiny_repo) -> None:
    """A variant's graph configs come from biva_export.repository.graph_config with the exported serving config
    under the variant's settings: parsed by Triton's protobuf, the settings where Triton reads them."""
    from biva_bench.triton import exported_serving, write_variant
    from biva_export.repository import parse_config

    out = write_variant(tiny_repo, tmp_path / "v", ["biva_score"], Variant(dynamic_batching=False, threads=2,
                                                                           instances=3, spinning=True))
    cfg = parse_config((out / "biva_graph_scorer" / "config.pbtxt").read_text())
    assert not cfg.HasField("dynamic_batching") and cfg.instance_group[0].count == 3
    assert cfg.parameters["intra_op_threads"].string_value == "2"
    assert cfg.parameters["intra_op_spinning"].string_value == "1"
    on = write_variant(tiny_repo, tmp_path / "w", ["biva_score"], Variant(queue_delay_us=100))
    cfg = parse_config((on / "biva_graph_scorer" / "config.pbtxt").read_text())
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert cfg.instance_group[0].count == exported_serving(tiny_repo).instances
    same = write_variant(tiny_repo, tmp_path / "x", ["biva_score"], Variant())
    assert (same / "biva_graph_scorer" / "config.pbtxt").read_text() == \
        (tiny_repo / "biva_graph_scorer" / "config.pbtxt").read_text()


def test_layouts_parse_and_name_themselves() -> None:
    assert parse_layout("2x1:nospin") == {"instances": 2, "threads": 1, "spinning": False}
    assert parse_layout(" 1x2 ") == {"instances": 1, "threads": 2, "spinning": None}
    assert Variant(**parse_layout("1x2:spin")).layout == "1x2:spin"
    for bad in ("2x", "0x2", "1x2:fast", "2*1"):
        with pytest.raises(ValueError, match="INSTANCESxTHREADS"):
            parse_layout(bad)
    from biva_bench.config import QUICK

    twice = (Variant(instances=2, threads=1), Variant(instances=2, threads=1))
    with pytest.raises(ValueError, match="listed twice"):
        replace(QUICK, layouts=twice)
    with pytest.raises(ValueError, match="neighbour needs the processes load"):
        replace(QUICK, load="async", neighbour=True)


def test_batching_ratios_against_the_ceiling() -> None:
    """16 clients' rate over the best in-process rate of the sweep's graph (ONNX Runtime or the served route), for
    the main sweep and every layout, explained when above 1; the 16 / 1 scaling stays as it was."""
    from biva_bench.report import compute_ratios

    sweep = lambda one, sixteen: {"1": {"images_per_s": one}, "16": {"images_per_s": sixteen}}  # noqa: E731
    result = {"graphs": {"scorer_k1": {"rows_per_image": 1, "results": {
                  "ort": {"1": {"images_per_s": 150.0}, "64": {"images_per_s": 300.0}}}}},
              "concurrency": {"case": "scorer_k1", "dynamic_batching": sweep(100.0, 240.0),
                              "layouts": {"2x1:nospin": {"sweep": sweep(80.0, 285.0)}}}}
    r = compute_ratios(result)
    assert r["dynamic_batching_scaling"]["value"] == pytest.approx(2.4)
    assert r["dynamic_batching_scaling"]["ceiling"] == pytest.approx(3.0)
    main = r["dynamic_batching_of_ceiling"]
    assert main["value"] == pytest.approx(0.8) and main["met"] is False and main["target"] == 0.9
    layout = r["dynamic_batching_layouts"]["2x1:nospin"]
    assert layout["of_ceiling"]["value"] == pytest.approx(0.95) and layout["of_ceiling"]["met"] is True
    assert layout["scaling"]["value"] == pytest.approx(285 / 80)
    assert "why_above_1" not in main
    # the served route, when measured, is what the graph models run too: a faster one raises the ceiling
    result["graphs"]["scorer_k1"]["results"]["served"] = {"64": {"images_per_s": 400.0}}
    assert compute_ratios(result)["dynamic_batching_of_ceiling"]["value"] == pytest.approx(0.6)
    result["concurrency"]["dynamic_batching"] = sweep(100.0, 440.0)
    above = compute_ratios(result)["dynamic_batching_of_ceiling"]
    assert above["value"] == pytest.approx(1.1) and "two instances" in above["why_above_1"]


def test_served_over_compile_comes_from_the_alternated_calls_when_measured() -> None:
    """The acceptance ratio takes the calls in turn where the run made them, shows the windows' ratio beside it,
    and falls back to the windows (said so) where it did not; markdown shows both."""
    from biva_bench.report import compute_ratios, markdown

    cell = lambda ips: {"images_per_s": ips, "latency_ms": {"p50": 1.0, "p99": 2.0}, "stable": True}  # noqa: E731
    cells = lambda s, c: {"served": {"1": cell(s[0]), "64": cell(s[1])},  # noqa: E731
                          "compile": {"1": cell(c[0]), "64": cell(c[1])}, "triton_grpc_api": {"64": cell(600.0)}}
    result = {"graphs": {"sampler": {"rows_per_image": 1, "results": cells((130.0, 800.0), (100.0, 1000.0)),
                                     "alternated": {"64": {"images_per_s": {"served": 1050.0, "compile": 1000.0},
                                                           "reps": 21, "turn": 1}}}}}
    r = compute_ratios(result)["served_over_compile"]["sampler"]
    assert r["64"]["value"] == pytest.approx(1.05) and r["64"]["met"] and r["64"]["windowed"] == pytest.approx(0.8)
    assert "21 rounds of 1 alternated" in r["64"]["what"]
    assert r["1"]["value"] == pytest.approx(1.3) and "windows" in r["1"]["what"] and "windowed" not in r["1"]
    api = compute_ratios(result)["triton_grpc_api_over_served"]["sampler"]["64"]
    assert api["value"] == pytest.approx(0.75) and not api["met"] and "windows" in api["what"]
    # the gRPC / in-process ratio from its own calls in turn; batch 1 from turns of 8 after an untimed call
    result["graphs"]["sampler"]["alternated_api"] = {"64": {"images_per_s": {"triton_grpc_api": 900.0,
                                                                             "served": 1000.0}, "reps": 21, "turn": 1}}
    result["graphs"]["sampler"]["alternated"]["1"] = {"images_per_s": {"served": 90.0, "compile": 100.0}, "reps": 21,
                                                      "turn": 8, "settle": 1}
    ratios = compute_ratios(result)
    api, r1 = ratios["triton_grpc_api_over_served"]["sampler"]["64"], ratios["served_over_compile"]["sampler"]["1"]
    assert api["value"] == pytest.approx(0.9) and api["met"] and api["windowed"] == pytest.approx(0.75)
    assert "API model" in api["what"] and "21 rounds of 1 alternated" in api["what"]
    assert r1["value"] == pytest.approx(0.9) and not r1["met"] and r1["windowed"] == pytest.approx(1.3)
    assert "21 rounds of 8 alternated calls, each turn after 1 untimed call" in r1["what"]
    result.update(ratios=compute_ratios(result), flops={}, meta={"mode": "quick", "checkpoint": "c", "system": {
        "cpu_model": "x", "cpus_usable": 2, "threads": 2, "versions": {}}}, gemm={
        "n": 8, "gflops_per_s": 1.0, "start": {"gflops_per_s": 1.0}, "end": {"gflops_per_s": 1.0}})
    result["graphs"]["sampler"].update(graph="biva_graph_sampler", batches=[1, 64])
    result["flops"]["sampler"] = {"flops_per_image": 1e6, "flops_per_row_onnx": 1e6, "flops_per_row_torch": 1e6,
                                  "rows_per_image": 1}
    result["ratios"].update(dynamic_batching_scaling={"value": None, "target": 4.0, "met": None, "what": "s"},
                            dynamic_batching_of_ceiling={"value": None, "target": 0.9, "met": None, "what": "c"})
    md = markdown(result)
    assert "(windows: 0.80) | 1.05 | 0.95 | yes |" in md
    assert "batch 64: served route (in process) 1050.0, torch.compile 1000.0 images/s (21 rounds of 1)" in md
    assert ("batch 1: served route (in process) 90.0, torch.compile 100.0 images/s (21 rounds of 8, after 1 "
            "untimed)") in md
    assert "batch 64: Triton gRPC, API model 900.0, served route (in process) 1000.0 images/s (21 rounds of 1)" in md


def test_ort_session_spinning_option(tiny_repo) -> None:
    from biva_core.runtimes import OrtOptions, ort_session

    path = str(tiny_repo / "biva_graph_scorer" / "1" / "model.onnx")
    for spinning, flag in ((False, "0"), (True, "1")):
        opts = ort_session(path, OrtOptions(threads=1, spinning=spinning)).get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == flag


def test_variant_repository_holds_every_graph_a_front_model_calls(tmp_path: Path, tiny_repo) -> None:
    """biva_score calls the scorer (every sample): a bench of scorer_iw alone needs it in its repository; every
    graph a front model names in front_model.py must be copied."""
    import re

    from biva_bench.triton import write_variant
    from biva_core import contract

    out = write_variant(tiny_repo, tmp_path / "v", ["biva_score"], Variant())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["biva_graph_scorer", "biva_score"]
    source = (tiny_repo / "biva_score" / "1" / "model.py").read_text()
    called = {getattr(contract, c) for c in re.findall(r"self\._(?:call|exec_all)\((SAMPLER|ENCODER|SCORER)\b", source)}
    assert called == {g for gs in contract.FRONT_GRAPHS.values() for g in gs}


def test_stats_delta_per_request() -> None:
    before = {"inference_count": 10, "execution_count": 5, "success_count": 10, "success_ns": 0, "queue_count": 10,
              "queue_ns": 0, "compute_input_count": 0, "compute_input_ns": 0, "compute_infer_count": 0,
              "compute_infer_ns": 0, "compute_output_count": 0, "compute_output_ns": 0}
    after = {**before, "inference_count": 30, "execution_count": 10, "success_count": 30, "queue_ns": 40_000,
             "compute_infer_ns": 200_000, "success_ns": 300_000}
    d = stats_delta(before, after)
    assert d["requests"] == 20 and d["mean_batch_rows"] == pytest.approx(4.0)
    assert d["queue_us"] == pytest.approx(2.0) and d["compute_infer_us"] == pytest.approx(10.0)


@pytest.mark.slow
def test_onnx_flops_match_pytorch_where_nothing_was_pruned(tiny_ckpt, tiny_repo) -> None:
    import torch

    from biva_bench.flops import onnx_flops_per_row, torch_flops_per_row
    from biva_core.checkpoint import load_model
    from biva_export.graphs import GRAPH_MODULES, graph_specs, inference_copy
    from biva_export.onnx_export import example_inputs

    plain = inference_copy(load_model(tiny_ckpt)[0])
    specs = graph_specs(plain)
    for graph in ("biva_graph_sampler", "biva_graph_encoder", "biva_graph_scorer"):
        onnx_count = onnx_flops_per_row(tiny_repo / graph / "1" / "model.onnx")
        ex = example_inputs(specs[graph], plain, 3, seed=5)
        ref = torch_flops_per_row(GRAPH_MODULES[graph](plain), tuple(torch.from_numpy(ex[n])
                                                                     for n in specs[graph].input_names))
        assert onnx_count["complete"] and onnx_count["total"] == ref > 0


def test_cli_refuses_a_repository_from_another_checkpoint(tmp_path: Path, tiny_ckpt) -> None:
    from click.testing import CliRunner

    from biva_bench.cli import main

    repo = tmp_path / "repo"
    repo.mkdir()
    from biva_core.contract import Caps, ModelMeta

    meta = ModelMeta((1, 28, 28), "bernoulli", "threshold", 3, 5, 7, ("z1",), 16, "0" * 64, "sample", Caps())
    (repo / "export_report.json").write_text(json.dumps({"meta": meta.to_dict()}))
    res = CliRunner().invoke(main, ["--ckpt", str(tiny_ckpt), "--repo", str(repo), "--quick",
                                    "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 1 and "another checkpoint" in res.output


@pytest.mark.slow
@pytest.mark.server
def test_quick_bench_writes_every_figure(tmp_path: Path, tiny_ckpt, tiny_repo) -> None:
    import numpy as np

    from biva_bench.backends import API_MODELS
    from biva_bench.config import QUICK
    from biva_bench.run import run_bench

    # the sweeps' clients run in 2 processes (1, 2 and 8 coroutine clients each at levels 1, 4, 16; the default
    # asyncio load has its own test), with a neighbour process beside the server, plus one layout with
    # spinning off, twice; torch.compile has its own test (test_compiled_runner_matches_eager), the aoti backend
    # needs packages (tests/test_aoti.py)
    backends = QUICK.backends + ("ort_elu_native",)
    cfg = replace(QUICK, threads=1, measure=replace(QUICK.measure, window_s=0.05, max_windows=3),
                  backends=backends, load="processes", client_procs=2, neighbour=True, sweeps=("graph",),
                  layouts=(Variant(instances=2, threads=1, spinning=False),), layout_rounds=2)
    out = tmp_path / "bench_out"
    lines = []
    result = run_bench(tiny_ckpt, out, cfg, repo=tiny_repo, log=lines.append)

    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["ratios"] == json.loads(json.dumps(result["ratios"]))
    for key in ("meta", "gemm", "flops", "graphs", "concurrency", "ratios", "notes"):
        assert key in on_disk, key
    sysinfo = on_disk["meta"]["system"]
    assert sysinfo["cpu_count"] >= 1 and sysinfo["threads"] == 1
    assert {"torch", "onnxruntime", "tritonclient", "tritonserver"} <= set(sysinfo["versions"])
    assert on_disk["gemm"]["gflops_per_s"] > 0

    assert set(on_disk["graphs"]) == set(QUICK.cases)
    assert on_disk["graphs"]["scorer_iw"]["rows_per_image"] == QUICK.iw
    assert on_disk["graphs"]["ood_mode"]["rows_per_image"] == 1 + 2  # the mode pass and one per k of 1..L-1
    for case, entry in on_disk["graphs"].items():
        assert on_disk["flops"][case]["flops_per_image"] > 0
        # a score case is a biva_score request on every protocol: no separate API-model run
        scored = entry["triton_model"] == "biva_score"
        assert set(entry["results"]) == set(backends) - ({"triton_grpc_api"} if scored else set()), case
        for backend, cells in entry["results"].items():
            assert set(cells) == {str(b) for b in entry["batches"]}, (case, backend)
            for m in cells.values():
                assert m["images_per_s"] > 0 and m["latency_ms"]["p99"] >= m["latency_ms"]["p50"] > 0
                assert len(m["windows"]) == 3 and isinstance(m["stable"], bool)
                assert 0 < m["fraction_of_gemm"]
                if backend.startswith("triton"):
                    called = API_MODELS[entry["graph"]] if backend == "triton_grpc_api" else entry["triton_model"]
                    assert m["server"][called]["requests"] > 0 and m["server"][entry["graph"]]["requests"] > 0

    for case in ("sampler", "encoder", "scorer_k1"):  # a user's request through the API model, against in process:
        r = on_disk["ratios"]["triton_grpc_api_over_served"][case]["64"]  # from their calls in turn, windows beside
        cells, turns = on_disk["graphs"][case]["results"], on_disk["graphs"][case]["alternated_api"]
        assert set(turns) == {"64"} and turns["64"]["reps"] == QUICK.alternated_reps
        ips = turns["64"]["images_per_s"]
        assert r["value"] == pytest.approx(ips["triton_grpc_api"] / ips["served"]) and "alternated" in r["what"]
        assert r["windowed"] == pytest.approx(cells["triton_grpc_api"]["64"]["images_per_s"]
                                              / cells["served"]["64"]["images_per_s"])

    conc = on_disk["concurrency"]
    assert set(conc["layouts"]) == {"2x1:nospin"}
    layout = conc["layouts"]["2x1:nospin"]
    assert layout["variant"]["spinning"] is False
    assert len(layout["rounds"]) == 2 and layout["sweep"] in layout["rounds"]
    for sweep in (conc["dynamic_batching"], conc["no_dynamic_batching"], conc["layouts"]["2x1:nospin"]["sweep"]):
        assert set(sweep) == {str(n) for n in QUICK.concurrency}
        for n, m in sweep.items():
            assert m["images_per_s"] > 0 and {"queue_us", "compute_infer_us"} <= set(m["server"])
            assert m["concurrency"] == int(n) and len(m["windows"]) == 3
            load = m["load"]  # clients spread over the processes; the calls they sent back add up
            assert load["generator"] == "processes" and load["client_processes"] == min(2, int(n))
            assert int(n) * load["calls_per_client_min"] <= m["calls"] <= int(n) * load["calls_per_client_max"]
            assert load["client_cpu_us_per_call"] > 0
            assert m["server"]["requests"] > 0
            assert m["neighbour"]["gflops_per_s"] > 0 and m["neighbour"]["alone_gflops_per_s"] > 0
    # without the batcher every execution is one request; Triton updates the inference and execution
    # counters separately, so a statistics snapshot can land between the two: allow 5%
    mean_rows = [m["server"]["mean_batch_rows"] for m in conc["no_dynamic_batching"].values()]
    assert all(0.95 <= r <= 1.05 for r in mean_rows), mean_rows

    r = on_disk["ratios"]
    for case in ("sampler", "encoder", "scorer_k1"):
        assert r["ort_over_torch"][case]["1"]["value"] > 0 and r["ort_over_torch"][case]["64"]["value"] > 0
        assert r["ort_over_elu_native"][case]["64"]["value"] > 0  # the served ELU form against the Elu node
        assert r["triton_grpc_over_ort"][case]["64"]["value"] > 0
    assert r["dynamic_batching_scaling"]["value"] > 0
    measured = on_disk["graphs"]["scorer_k1"]["results"]  # the ceiling: the best of what the graph models run
    assert 0 < r["dynamic_batching_of_ceiling"]["value"] == pytest.approx(
        conc["dynamic_batching"]["16"]["images_per_s"] / max(
            m["images_per_s"] for b in ("ort", "served") for m in measured.get(b, {}).values()))
    assert r["dynamic_batching_layouts"]["2x1:nospin"]["of_ceiling"]["value"] > 0
    assert r["scorer_peak_fraction"]["value"] > 0 and r["scorer_peak_fraction"]["backend"] in backends
    iw = r["iw_peak_fraction"]  # the IW likelihood: seconds per image and the fraction of the GEMM rate
    assert iw["value"] > 0 and iw["target"] == 0.7 and set(iw["seconds_per_image"]) == set(backends) - {"triton_grpc_api"}
    assert all(s > 0 for s in iw["seconds_per_image"].values())
    f = on_disk["flops"]["scorer_iw"]
    assert 0 < f["flops_per_image"] < f["flops_per_image_encoder_rows"]  # the stages that see x alone: once per call

    assert "api_sweep" not in on_disk and on_disk["ratios"]["api_of_ceiling"] == {}  # not asked for
    assert "--biva-direct" in conc["path"]

    md = (out / "bench.md").read_text()
    assert "## Targets" in md and "## Concurrency sweep" in md and "## Importance-weighted likelihood" in md
    assert "## API sweep" not in md and "direct to the graph model" in md
    for png in ("throughput_vs_batch.png", "latency_vs_concurrency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_api_loads_are_the_requests_users_send() -> None:
    """biva_score with the OOD estimator (the ood_mode case's request: mode, every k), biva_sample's n, biva_detect
    where the repository has it; each load's feeds as biva_client forms them."""
    import numpy as np

    from biva_bench.backends import POOL, api_load_feeds, api_loads, make_cases
    from biva_core.contract import DETECT, SAMPLE, SCORE, T

    cases = make_cases(8, 4)
    loads = api_loads(cases, (1, 16), (1, 64), detect=True)
    assert [(x.name, x.model, x.images, x.case.name) for x in loads] == [
        ("score_ood_b1", SCORE, 1, "ood_mode"), ("score_ood_b16", SCORE, 16, "ood_mode"),
        ("sample_n1", SAMPLE, 1, "sampler"), ("sample_n64", SAMPLE, 64, "sampler"),
        ("detect_b1", DETECT, 1, "ood_mode")]
    assert "detect_b1" not in [x.name for x in api_loads(cases, (1,), (1,), detect=False)]
    make = lambda rows, seed: {T.images: np.random.default_rng(seed).random((rows, 1, 28, 28), np.float32)}  # noqa
    score = api_load_feeds(loads[1], make, 5)
    assert len(score) == POOL and score[0][T.images].shape[0] == 16
    assert score[0][T.estimator][0] == b"mode" and list(score[0][T.ks]) == [1, 2, 3]
    assert len({int(f[T.seed][0]) for f in score}) == POOL  # distinct seeds: distinct noise
    sample = api_load_feeds(loads[3], make, 5)
    assert [int(f[T.n][0]) for f in sample] == [64] * POOL
    detect = api_load_feeds(loads[4], make, 5)
    assert set(detect[0]) == {T.images, T.seed} and detect[0][T.images].shape[0] == 1


def test_busy_answers_are_retried_after_their_wait() -> None:
    """The API sweep's clients, as biva_client: a busy answer waits its Retry-After, anything else is an error."""
    from tritonclient.utils import InferenceServerException

    from biva_bench.loadgen import busy_wait
    from biva_core.contract import BUSY_PREFIX, RETRY_AFTER_S

    assert busy_wait(InferenceServerException(f"{BUSY_PREFIX} queue full; retry after 3 s", status="429")) == 3.0
    assert busy_wait(InferenceServerException("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE")) \
        == RETRY_AFTER_S
    assert busy_wait(InferenceServerException("images: expected 4 dims", status="400")) is None
    assert busy_wait(RuntimeError("connection reset")) is None


@pytest.mark.slow
@pytest.mark.server
def test_quick_api_sweep_through_the_fronts(tmp_path: Path, tiny_ckpt, tiny_repo) -> None:
    """The API sweep on the tiny model: each request over gRPC and HTTP through the fronts of tritonserver as
    users start it, Triton's statistics of the API and graph models, the ratio to the in-process ceiling."""
    from biva_bench.config import QUICK
    from biva_bench.run import run_bench
    from biva_core.contract import SAMPLER, SCORER

    cfg = replace(QUICK, threads=1, cases=("sampler", "ood_mode"), backends=("ort", "served"), sweeps=("api",),
                  concurrency=(1, 16), measure=replace(QUICK.measure, window_s=0.05, max_windows=3))
    out = tmp_path / "bench_out"
    lines = []
    result = run_bench(tiny_ckpt, out, cfg, repo=tiny_repo, log=lines.append)
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["ratios"] == json.loads(json.dumps(result["ratios"]))
    assert "concurrency" not in on_disk  # the graph sweep was not asked for
    sweep = on_disk["api_sweep"]
    assert sweep["protocols"] == ["grpc", "http"] and sweep["levels"] == [1, 16] and "fronts" in sweep["server"]
    assert set(sweep["loads"]) == {"score_ood_b1", "score_ood_b16", "sample_n1", "sample_n64"}  # no detector here
    assert "biva_detect" in sweep["note"]
    graph_of = {"biva_score": SCORER, "biva_sample": SAMPLER}
    for name, load in sweep["loads"].items():
        graph = graph_of[load["model"]]
        assert load["graphs"] == [graph]
        for proto in ("grpc", "http"):
            assert set(load[proto]) == {"1", "16"}, (name, proto)
            for n, m in load[proto].items():
                assert m["images_per_call"] == load["images_per_request"] and m["concurrency"] == int(n)
                assert m["images_per_s"] > 0 and m["latency_ms"]["p99"] >= m["latency_ms"]["p90"] >= \
                    m["latency_ms"]["p50"] > 0
                assert m["load"]["protocol"] == proto and m["load"]["client_processes"] == min(2, int(n))
                api, g = m["server"][load["model"]], m["server"][graph]
                # Triton saw the level's requests at the API model and the calls it made to its graph
                assert api["requests"] > 0 and g["requests"] > 0
                # the statistics are two snapshots taken while requests run: an execution may be counted before its
                # inferences (a fresh-clone run saw 18 / 19 = 0.947), so the mean batch is only near 1 or above
                assert api["compute_infer_us"] > 0 and g["compute_infer_us"] > 0 and g["mean_batch_rows"] >= 0.75
                # the server's CPU over the same windows (whole 10 ms ticks, so a part may read 0 in windows this
                # short): the server worked, and the parts add up
                cpu = m["cpu"]
                assert all(cpu[f"{p}_ms"] >= 0 for p in ("fronts", "tritonserver", "api_stubs", "graph_stubs")), cpu
                assert cpu["server_ms"] > 0, cpu
                assert cpu["server_ms"] == pytest.approx(sum(cpu[f"{p}_ms"] for p in (
                    "fronts", "tritonserver", "api_stubs", "graph_stubs")))
                assert 0 < cpu["server_cores"] and cpu["clients_ms"] > 0
        if name == "sample_n1":  # one image per request, one graph call each: a mean batch above 1 is batching
            assert load["grpc"]["1"]["server"][graph]["mean_batch_rows"] == pytest.approx(1.0, abs=0.1)
    ratios = on_disk["ratios"]["api_of_ceiling"]
    for name in ("score_ood_b1", "sample_n1"):
        case = sweep["loads"][name]["ceiling_case"]
        best = max(m["images_per_s"] for b in ("ort", "served")
                   for m in on_disk["graphs"][case]["results"][b].values())
        for proto in ("grpc", "http"):
            r = ratios[name][proto]
            assert r["ceiling"] == pytest.approx(best) and r["target"] == 0.9
            assert r["value"] == pytest.approx(sweep["loads"][name][proto]["16"]["images_per_s"] / best)
    md = (out / "bench.md").read_text()
    assert "## API sweep" in md and "| score_ood_b1 | grpc | 16 |" in md and "| sample_n64 | http | 1 |" in md
    assert "16 grpc clients through the fronts / the ceiling" in md
    assert "| request | protocol | clients | server ms | fronts | tritonserver | API stubs |" in md
    assert any("score_ood_b1 over grpc" in line for line in lines)


def test_tree_cpu_sorts_a_servers_processes_into_parts(tmp_path: Path) -> None:
    """bench/cpu.py: under a root process (the launcher's place), a child named as a graph model's stub is counted
    as one with the CPU it burnt (measured by the child itself), and no other part gets any."""
    import os
    import signal
    import subprocess
    import sys

    from biva_bench.cpu import PARTS, cpu_per_request, tree_cpu

    model = tmp_path / "biva_graph_sampler" / "1" / "model.py"
    model.parent.mkdir(parents=True)
    model.write_text("import time\nwhile time.process_time() < 0.3:\n    pass\nprint('burnt', flush=True)\n"
                     "time.sleep(120)\n")
    stub = tmp_path / "triton_python_backend_stub"  # argv[0] as Triton starts the stubs, argv[1] the model file
    root = subprocess.Popen(["bash", "-c", f'exec -a "{stub}" "{sys.executable}" "{model}" & wait'],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        start = tree_cpu(root.pid)
        assert root.stdout.readline().strip() == "burnt"
        reading = tree_cpu(root.pid)
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait(timeout=30)
    cpu = {p: sum(c for part, c in reading["pids"].values() if part == p) for p in PARTS}
    assert cpu["graph_stubs"] >= 0.29 and cpu["api_stubs"] == 0 and cpu["tritonserver"] == 0, cpu
    assert cpu["fronts"] < 0.29  # the root (bash) only waited
    # per process: the stub counts from where the first reading saw it (or from zero, had it not been there yet)
    seen = sum(c for part, c in start["pids"].values() if part == "graph_stubs")
    per = cpu_per_request(start, reading, 4)
    assert per["graph_stubs_ms"] == pytest.approx((cpu["graph_stubs"] - seen) * 1e3 / 4)
    assert per["api_stubs_ms"] == 0 and per["server_cores"] > 0
    # a stub replaced between two readings (a supervisor's recycle): the new one counts from zero, never negative
    replaced = {"t": reading["t"] + 2.0, "pids": {1 << 30: ("graph_stubs", 0.5)}}
    per = cpu_per_request(reading, replaced, 1)
    assert per["graph_stubs_ms"] == pytest.approx(500.0) and per["server_cores"] == pytest.approx(0.25)
    assert cpu_per_request(reading, replaced, 0) is None
