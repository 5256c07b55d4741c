"""The compiled route, biva-export's default (`--runtime aoti`, export/aoti.py): AOTInductor packages of the three
graphs, compiled in worker processes (or taken from the cache), validated against PyTorch at export, served by a
real tritonserver with the same answers PyTorch gives, refused on a processor without their instruction sets."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biva_core.checkpoint import load_model
from biva_core.data import load_for_model
from biva_core.noise import NoiseStream
from biva_core.objectives import evaluate_bounds
from biva_core.contract import REPORT
from biva_core.routing import (AOTI_MIN_ROWS, AOTI_MIN_THREADS, AOTI_SLICE_ROWS, PACKAGE_FILE, SLICE_PACKAGE_FILE,
                               served_ranges, served_runtime)
from biva_export.pipeline import ExportConfig, ExportError, run_export
from biva_export.serving_config import ServingConfig
from biva_export.repository import parse_config
from serving_helpers import i64, infer, serve

torch.set_num_threads(1)
NATS_TOL, IMAGE_TOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def aoti_cache(tmp_path_factory):
    """A package cache of this module's own (XDG_CACHE_HOME), empty at first."""
    import os

    root = tmp_path_factory.mktemp("xdg_cache")
    old, os.environ["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME"), str(root)
    yield root
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def aoti_repo(tiny_ckpt, tmp_path_factory, aoti_cache):
    out = tmp_path_factory.mktemp("aoti") / "triton_models"
    # two package threads per instance: one-thread instances serve ONNX Runtime alone (routing.AOTI_MIN_THREADS)
    serving = ServingConfig(runtime="aoti", max_batch=64, threads=1, aoti_threads=2)
    run_export(tiny_ckpt, out, ExportConfig(serving=serving), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def aoti_server(aoti_repo, tmp_path_factory):
    yield from serve(aoti_repo, tmp_path_factory, "aoti_server")


@pytest.mark.slow
def test_packages_are_validated_and_written_beside_the_graphs(aoti_repo):
    report = json.loads((aoti_repo / REPORT).read_text())
    assert report["serving"]["runtime"] == "aoti"
    for name in ("biva_graph_sampler", "biva_graph_encoder", "biva_graph_scorer"):
        pkg = report["graphs"][name]["package"]
        assert pkg["ok"] and all(pkg["max_abs_diff"][k] <= pkg["atol"][k] for k in pkg["atol"]), name
        assert (aoti_repo / name / "1" / PACKAGE_FILE).stat().st_size == pkg["bytes"] > 0
        cfg = parse_config((aoti_repo / name / "config.pbtxt").read_text())
        assert cfg.parameters["runtime"].string_value == "aoti"
        isa = json.loads(cfg.parameters["aoti_isa"].string_value)
        assert isa == pkg["isa"] and isa["flags"] and not pkg["cached"] and pkg["compile_s"] > 0
        # the package for full slices: validated at exactly that batch, beside the other
        sliced = report["graphs"][name]["slice_package"]
        assert sliced["ok"] and sliced["batches"] == [AOTI_SLICE_ROWS] * 3 and sliced["isa"] == isa
        assert (aoti_repo / name / "1" / SLICE_PACKAGE_FILE).stat().st_size == sliced["bytes"] > 0
        assert report["graphs"][name]["serves"] == served_ranges("aoti", 64, slice_package=True)
    few, small, large = report["graphs"][name]["serves"]  # one-thread instances: ONNX Runtime alone
    assert few == {"rows": "1-64", "threads": f"below {AOTI_MIN_THREADS}", "runtime": "onnxruntime",
                   "file": "model.onnx"}
    assert small == {"rows": f"1-{AOTI_MIN_ROWS - 1}", "threads": f"{AOTI_MIN_THREADS} or more",
                     "runtime": "onnxruntime", "file": "model.onnx"}
    assert large["rows"] == f"{AOTI_MIN_ROWS}-64" and large["runtime"] == "aoti" and large["file"] == PACKAGE_FILE


@pytest.mark.slow
def test_the_packages_loops_take_their_thread_count_at_run_time(aoti_repo):
    """The packages compile in one-thread workers; their fused loops must still run on as many threads as the
    process that loads them sets (inductor's cpp.dynamic_threads), not be fixed at the compiling worker's one:
    with it fixed, inductor writes no parallel region at all and a 2-thread caller runs every fused loop serial."""
    import re
    import zipfile

    for name in ("biva_graph_sampler", "biva_graph_encoder", "biva_graph_scorer"):
        for file in (PACKAGE_FILE, SLICE_PACKAGE_FILE):
            with zipfile.ZipFile(aoti_repo / name / "1" / file) as z:
                code = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("kernel.cpp"))
            regions = re.findall(r"#pragma omp parallel[^\n]*", code)
            assert regions, (name, file)  # the fused loops run in parallel regions ...
            assert not [r for r in regions if "num_threads(" in r], (name, file)  # ... of the caller's thread count


@pytest.mark.slow
def test_a_second_export_takes_the_packages_from_the_cache_and_validates_them(aoti_repo, tiny_ckpt, tmp_path):
    """Same checkpoint, same machine: no compiling (seconds, not minutes), the same validated packages. Built for a
    bigger target (target_threads, biva-export --target-threads) whatever this machine's layout."""
    import time

    t = time.monotonic()
    report = run_export(tiny_ckpt, tmp_path / "again", ExportConfig(serving=ServingConfig(runtime="aoti", max_batch=64),
                                                                    target_threads=2),
                        log=lambda *_: None)
    took = time.monotonic() - t
    assert report["packages"]["built"] and report["packages"]["threads_per_instance"] == 2
    assert "--target-threads" in report["packages"]["why"]
    for name, entry in report["graphs"].items():
        assert entry["package"]["cached"] and entry["package"]["ok"], name
        assert entry["slice_package"]["cached"] and entry["slice_package"]["ok"], name
        assert (tmp_path / "again" / name / "1" / PACKAGE_FILE).read_bytes() == \
            (aoti_repo / name / "1" / PACKAGE_FILE).read_bytes()
    print(f"second export: {took:.1f} s")


@pytest.mark.slow
def test_no_slice_packages_exports_the_general_package_alone(aoti_repo, tiny_ckpt, tmp_path):
    """biva-export --target-threads 2 --no-slice-packages: each graph's package for every batch size (from the cache)
    and no slice package; the report says every full slice runs on model.pt2."""
    from click.testing import CliRunner

    from biva_export.cli import main

    out = tmp_path / "no_slices"
    res = CliRunner().invoke(main, ["--ckpt", str(tiny_ckpt), "--out", str(out), "--max-batch-size", "64",
                                    "--target-threads", "2", "--no-slice-packages"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / REPORT).read_text())
    for name, entry in report["graphs"].items():
        assert entry["package"]["cached"] and "slice_package" not in entry, name
        assert (out / name / "1" / PACKAGE_FILE).is_file() and not (out / name / "1" / SLICE_PACKAGE_FILE).exists()
        assert entry["serves"] == served_ranges("aoti", 64, slice_package=False)
        assert "full_slices" not in entry["serves"][2]


@pytest.fixture(scope="module")
def bare_repo(tiny_ckpt, tmp_path_factory):
    """The default export on the project's 2-core machine (two one-thread graph instances): no package compiled
    (aoti.PackageBuilds is not even started); the repository and the export's log lines."""
    from biva_export import aoti, pipeline

    def no_builds(*_a, **_k):
        raise AssertionError("the default layout on 2 cores compiles no package")

    out, lines = tmp_path_factory.mktemp("bare") / "triton_models", []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "usable_cores", lambda: 2)
        mp.setattr(aoti, "PackageBuilds", no_builds)
        run_export(tiny_ckpt, out, ExportConfig(serving=ServingConfig(max_batch=64)), log=lines.append)
    return out, lines


def test_the_default_layout_on_two_cores_exports_no_package_and_says_why(bare_repo):
    """Two one-thread instances serve ONNX Runtime at every size, so the export compiles nothing for them (seconds,
    not minutes) and its log and report say why in one line; the configs keep the aoti route for bigger instances."""
    repo, lines = bare_repo
    report = json.loads((repo / REPORT).read_text())
    assert report["serving"]["runtime"] == "aoti"
    packages = report["packages"]
    assert packages == {"built": False, "threads_per_instance": 1, "target_threads": 0, "why": packages["why"]}
    why = packages["why"]
    assert why.startswith("none: instances run 1 package thread (2 cores / 2 instances here), fewer than the 2") and \
        "--target-threads" in why and "\n" not in why
    assert [line for line in lines if "AOTInductor" in line] == [f"AOTInductor packages: {why}"]
    for name in ("biva_graph_sampler", "biva_graph_encoder", "biva_graph_scorer"):
        entry = report["graphs"][name]
        assert "package" not in entry and "slice_package" not in entry
        assert entry["serves"] == served_ranges("onnxruntime", 64, slice_package=False)
        assert not list((repo / name / "1").glob("*.pt2"))
        cfg = parse_config((repo / name / "config.pbtxt").read_text())
        assert cfg.parameters["runtime"].string_value == "aoti" and "aoti_isa" not in cfg.parameters


def test_package_plan_follows_the_layout_the_target_runs() -> None:
    """Packages are compiled where the served layout runs them (2 or more package threads per instance: more cores,
    --threads, --target-threads), not for one-thread instances nor --runtime onnxruntime; a target that contradicts
    the threads the config fixes is refused."""
    from biva_export.pipeline import package_plan

    plan = lambda cores=2, target=0, **sc: package_plan(ExportConfig(serving=ServingConfig(**sc),  # noqa: E731
                                                                     target_threads=target), cores)[:2]
    assert plan() == (False, 1) and plan(cores=3) == (False, 1)
    assert plan(cores=8) == (True, 4) and plan(cores=8, instances=4) == (True, 2)
    assert plan(threads=2) == (True, 2) and plan(threads=1, aoti_threads=2) == (True, 2)
    assert plan(target=4) == (True, 4) and plan(target=1, cores=16) == (False, 1)
    assert plan(threads=4, target=4) == (True, 4)
    assert plan(runtime="onnxruntime", target=4) == (False, 0)
    with pytest.raises(ExportError, match="--target-threads 4 contradicts the 1 threads"):
        plan(threads=1, target=4)


def test_target_threads_against_threads_fails_in_one_line_before_exporting(tiny_ckpt, tmp_path) -> None:
    from click.testing import CliRunner

    from biva_export.cli import main

    res = CliRunner().invoke(main, ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "r"), "--threads", "1",
                                    "--target-threads", "4"])
    assert res.exit_code == 1 and res.output.startswith("Error: --target-threads 4 contradicts") and \
        res.output.count("\n") == 1
    assert not (tmp_path / "r").exists()


class _FakeLogger:
    lines: list = []

    @staticmethod
    def log_warn(msg):
        _FakeLogger.lines.append(msg)


def _load_graph_model(repo, name: str, monkeypatch, threads: str):
    """The repository's graph model.py in this process, behind a stand-in for triton_python_backend_utils, with its
    config's thread parameter edited to `threads`; returns (module, config as Triton passes it)."""
    import importlib.util
    import sys
    import types

    from google.protobuf import json_format

    pb = types.ModuleType("triton_python_backend_utils")
    pb.Logger = _FakeLogger
    pb.triton_string_to_numpy = lambda t: {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}[t]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location(f"served_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(parse_config((repo / name / "config.pbtxt").read_text()),
                                       preserving_proto_field_name=True)
    config["parameters"]["intra_op_threads"]["string_value"] = threads
    return module, config


def test_a_repository_without_packages_served_on_more_threads_says_so_once_and_serves_onnx_runtime(
        bare_repo, tiny_ckpt, monkeypatch) -> None:
    """The config's thread parameter edited to 2 (or a bigger machine's share of its cores): the graph model's first
    instance says in one line that the repository has no package and serves ONNX Runtime, at every size, with
    PyTorch's numbers; its other instances load quietly. Left at one thread, nothing is said."""
    from biva_export.graphs import graph_specs, inference_copy
    from biva_export.onnx_export import compare_with_torch

    repo, _ = bare_repo
    name = "biva_graph_scorer"
    model, _ = load_model(tiny_ckpt)
    plain = inference_copy(model)
    for threads, first_says in (("2", True), ("1", False)):
        module, config = _load_graph_model(repo, name, monkeypatch, threads)
        _FakeLogger.lines.clear()
        instances = []
        for i in range(2):
            inst = module.TritonPythonModel()
            inst.initialize({"model_config": json.dumps(config), "model_repository": str(repo / name),
                             "model_version": "1", "model_instance_kind": "CPU",
                             "model_instance_name": f"{name}_0_{i}"})
            instances.append(inst)
        if first_says:
            assert len(_FakeLogger.lines) == 1, _FakeLogger.lines
            line = _FakeLogger.lines[0]
            assert line.startswith(f"{name}: instances of 2 threads would run the AOTInductor package") and \
                "has none" in line and "serving ONNX Runtime" in line and "--target-threads 2" in line
            assert "\n" not in line
        else:
            assert _FakeLogger.lines == []
        for inst in instances:
            assert inst.runtime == "onnxruntime"
            rep = compare_with_torch(graph_specs(plain)[name], plain, inst.run, batches=(1, 8, 33))
            assert rep.ok, rep.summary()


@pytest.mark.server
def test_a_served_repository_without_packages_on_two_threads_says_so_once_per_graph_and_serves(bare_repo, tiny_ckpt,
                                                                                               tmp_path):
    """tritonserver on the package-less repository with each graph's thread parameter edited to 2: one line per graph
    model in the server's log, and biva_sample serves PyTorch's images."""
    import re
    import shutil

    from biva_serving.process import start_server

    repo = tmp_path / "repo"
    shutil.copytree(bare_repo[0], repo)
    for name in ("biva_graph_sampler", "biva_graph_encoder", "biva_graph_scorer"):
        cfg = repo / name / "config.pbtxt"
        text = cfg.read_text()
        edited = text.replace('key: "intra_op_threads" value: { string_value: "0" }',
                              'key: "intra_op_threads" value: { string_value: "2" }')
        assert edited != text
        cfg.write_text(edited)
    handle = start_server(repo, log_path=tmp_path / "server.log")
    try:
        images, = infer(handle, "grpc", "biva_sample", {"n": i64(16), "seed": i64(5)}, ["images"])
    finally:
        handle.stop()
    model, _ = load_model(tiny_ckpt)
    with torch.no_grad():
        want = model.sample(NoiseStream(5).take((16, model.latent_dim))).x_mean.numpy()
    assert np.abs(images - want).max() <= IMAGE_TOL
    said = [line for line in (tmp_path / "server.log").read_text().splitlines()
            if "would run the AOTInductor package" in line]
    assert sorted(re.search(r"(biva_graph_\w+): instances of 2 threads", line)[1] for line in said) == \
        ["biva_graph_encoder", "biva_graph_sampler", "biva_graph_scorer"], said


def test_a_package_for_another_processor_is_refused_in_one_line(tmp_path) -> None:
    """A package compiled for instruction sets this processor lacks: the graph model's check and the launcher's
    (before Triton starts) name both processors."""
    from biva_core.runtimes import check_package_isa, cpu_info
    from biva_serving.launcher import check_repository

    isa = {"cpu": "Imaginary CPU 9000", "flags": ["avx512f", "imaginary_isa"]}
    with pytest.raises(RuntimeError, match="Imaginary CPU 9000.*lacks imaginary_isa") as e:
        check_package_isa("biva_graph_scorer", isa)
    assert cpu_info()[0] in str(e.value) and "\n" not in str(e.value)
    check_package_isa("biva_graph_scorer", {"cpu": "here", "flags": sorted(cpu_info()[1])[:3]})  # what we have: fine
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / REPORT).write_text(json.dumps({"graphs": {"biva_graph_scorer": {"package": {"isa": isa}}}}))
    complaint = check_repository(["--model-repository", str(repo)])
    assert complaint and "lacks imaginary_isa" in complaint and "biva-export" in complaint


def test_aoti_needs_the_python_backend(tiny_ckpt, tmp_path):
    cfg = ExportConfig(serving=ServingConfig(runtime="aoti", backend="onnxruntime"), validate=False)
    with pytest.raises(ExportError, match="--runtime aoti needs the python backend"):
        run_export(tiny_ckpt, tmp_path / "repo", cfg, log=lambda *_: None)
    assert not (tmp_path / "repo").exists()


@pytest.mark.slow
@pytest.mark.server
def test_served_packages_give_pytorch_numbers(aoti_server, tiny_ckpt):
    """biva_score (IW over several scorer calls, every k) and biva_sample through the compiled graphs, against
    biva_core on the same seeds: within 1e-3 nats and 1e-4 per pixel."""
    model, meta = load_model(tiny_ckpt)
    x = load_for_model("digits", meta, limit=5)
    ks = [0, 2]
    elbo, iw, lgk = infer(aoti_server, "grpc", "biva_score", {"images": x, "iw": i64(50), "ks": i64(ks),
                                                               "seed": i64(11)}, ["elbo", "iw_bound", "l_gt_k"])
    ref = evaluate_bounds(model, torch.from_numpy(x), NoiseStream(11), 50, tuple(ks))
    assert np.abs(elbo - ref.elbo.numpy()).max() <= NATS_TOL
    assert np.abs(iw - ref.iw.numpy()).max() <= NATS_TOL
    for j, k in enumerate(ks):
        assert np.abs(lgk[:, j] - ref.l_gt_k[k].numpy()).max() <= NATS_TOL
    # 4 samples run on ONNX Runtime; 64 are split in two 32-row calls, one per instance: full slices, on the slice
    # package
    for n in (4, 64):
        images, seed = infer(aoti_server, "http", "biva_sample", {"n": i64(n), "seed": i64(5)}, ["images", "seed"])
        with torch.no_grad():
            want = model.sample(NoiseStream(5).take((n, model.latent_dim))).x_mean.numpy()
        assert seed[0] == 5 and np.abs(images - want).max() <= IMAGE_TOL
    x = load_for_model("digits", meta, limit=64)
    elbo, lgk = infer(aoti_server, "grpc", "biva_score", {"images": x, "ks": i64(ks), "seed": i64(12)},
                      ["elbo", "l_gt_k"])
    ref = evaluate_bounds(model, torch.from_numpy(x), NoiseStream(12), 1, tuple(ks))
    assert np.abs(elbo - ref.elbo.numpy()).max() <= NATS_TOL
    assert np.abs(lgk - np.stack([ref.l_gt_k[k].numpy() for k in ks], axis=1)).max() <= NATS_TOL


def test_the_route_by_rows_and_package_threads() -> None:
    """The packages serve from AOTI_MIN_ROWS rows on instances of AOTI_MIN_THREADS package threads or more; one-thread
    instances (two per graph on a 2-core machine) and the onnxruntime runtime run ONNX Runtime at every size."""
    assert AOTI_MIN_THREADS == 2 and AOTI_MIN_ROWS == 8
    for rows, threads, want in ((1, 2, "onnxruntime"), (7, 8, "onnxruntime"), (8, 2, "aoti"), (1024, 16, "aoti"),
                                (8, 1, "onnxruntime"), (1024, 1, "onnxruntime")):
        assert served_runtime("aoti", rows, threads) == want, (rows, threads)
        assert served_runtime("onnxruntime", rows, threads) == "onnxruntime"


def test_full_slices_go_to_the_slice_package() -> None:
    """run_in_slices: a call of 70 images is two full 32-image slices on `full` and a 6-image rest on `run`, in
    order; the scorer's many-draw slices (fewer images than the slice's rows) never go to `full`."""
    from biva_core.routing import run_in_slices

    calls = []

    def tag(who: str):
        def run(f: dict) -> list[np.ndarray]:
            calls.append((who, len(f["images"])))
            return [f["images"][:, 0, 0, 0] + len(who)]
        return run
    x = np.arange(70, dtype=np.float32).reshape(70, 1, 1, 1)
    out, = run_in_slices(tag("run"), {"images": x}, rows=32, full=tag("full"))
    assert calls == [("full", 32), ("full", 32), ("run", 6)]
    assert np.array_equal(out, x[:, 0, 0, 0] + np.array([4] * 64 + [3] * 6))  # rows back in order
    calls.clear()
    run_in_slices(tag("run"), {"images": x[:40], "noise": np.zeros((40, 4, 2), np.float32)}, rows=32,
                  full=tag("full"))
    assert calls == [("run", 8)] * 5  # 4 draws per image: 8 images a slice
    calls.clear()
    run_in_slices(tag("run"), {"images": x}, rows=32)
    assert calls == [("run", 32), ("run", 32), ("run", 6)]


@pytest.mark.slow
def test_bench_runs_the_packages_in_process(aoti_repo, tiny_ckpt, tiny_repo, tmp_path):
    """biva-bench's aoti backend: the packages beside torch.compile, with their ratio; the served route and
    torch.compile also measured in turn, which the served/compile ratio comes from; a repository without
    packages is refused with a one-line reason."""
    from dataclasses import replace

    from biva_bench.config import QUICK, SMALL_TURN
    from biva_bench.run import BenchError, run_bench

    cfg = replace(QUICK, threads=1, backends=("compile", "aoti", "served"), cases=("sampler", "scorer_iw"),
                  measure=replace(QUICK.measure, window_s=0.05, max_windows=3))
    lines = []
    result = run_bench(tiny_ckpt, tmp_path / "out", cfg, repo=aoti_repo, log=lines.append)
    for case in ("sampler", "scorer_iw"):
        cells = result["graphs"][case]["results"]["aoti"]
        assert all(m["images_per_s"] > 0 for m in cells.values()), case
    assert result["ratios"]["aoti_over_compile"]["sampler"]["64"]["value"] > 0
    turns = result["graphs"]["sampler"]["alternated"]
    # every batch; not scorer_iw, whose K rows take seconds a call
    assert set(turns) == {"1", "64"} and "alternated" not in result["graphs"]["scorer_iw"]
    # below AOTI_MIN_ROWS, turns of SMALL_TURN calls after an untimed one (ONNX Runtime meets compile's threads)
    assert [(turns[b]["turn"], turns[b]["settle"]) for b in ("1", "64")] == [(SMALL_TURN, 1), (1, 0)]
    for b, cell in turns.items():
        assert cell["reps"] == QUICK.alternated_reps and set(cell["images_per_s"]) == {"served", "compile"}
        r = result["ratios"]["served_over_compile"]["sampler"][b]
        assert r["value"] == pytest.approx(cell["images_per_s"]["served"] / cell["images_per_s"]["compile"])
        assert "alternated" in r["what"] and r["windowed"] > 0
    assert sum("alternated   b=" in line for line in lines) == 2
    with pytest.raises(BenchError, match="no AOTInductor package"):
        run_bench(tiny_ckpt, tmp_path / "out2", cfg, repo=tiny_repo, log=lambda *_: None)


@pytest.mark.slow
def test_route_bench_times_every_runtime_alternately(aoti_repo, tiny_ckpt):
    """python -m studies.route: each graph's runtimes on the same 33 images (one full slice and a rest), with
    their ratios to torch.compile; an ONNX-only repository is refused in one line."""
    import click

    from studies.route import route_rates

    res = route_rates(tiny_ckpt, aoti_repo, rows=33, reps=2, threads=1, turn=2)
    for graph in ("biva_graph_sampler", "biva_graph_encoder", "biva_graph_scorer"):
        r = res[graph]
        assert all(r[k] > 0 for k in ("compile", "onnxruntime", "served_one_package", "served")), graph
        assert r["served_over_compile"] == pytest.approx(r["served"] / r["compile"])
    bare = aoti_repo.parent / "bare"
    (bare / "biva_graph_sampler" / "1").mkdir(parents=True, exist_ok=True)
    with pytest.raises(click.ClickException, match="no slice package"):
        route_rates(tiny_ckpt, bare, rows=33, reps=1, threads=1)
