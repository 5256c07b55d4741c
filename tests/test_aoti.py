"""The compiled route (`biva-export --runtime aoti`, export/aoti.py): AOTInductor packages of the three graphs,
validated against PyTorch at export, served by a real tritonserver with the same answers PyTorch gives."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biva_core.checkpoint import load_model
from biva_core.data import load_for_model
from biva_core.noise import NoiseStream
from biva_core.objectives import evaluate_bounds
from biva_core.contract import PACKAGE_FILE, REPORT
from biva_export.pipeline import ExportConfig, ExportError, run_export
from biva_core.contract import ServingConfig
from biva_export.repository import parse_config
from serving_helpers import i64, infer, serve

torch.set_num_threads(1)
NATS_TOL, IMAGE_TOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def aoti_repo(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti") / "triton_models"
    serving = ServingConfig(runtime="aoti", max_batch=64, threads=1)
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
    images, seed = infer(aoti_server, "http", "biva_sample", {"n": i64(4), "seed": i64(5)}, ["images", "seed"])
    with torch.no_grad():
        want = model.sample(NoiseStream(5).take((4, model.latent_dim))).x_mean.numpy()
    assert seed[0] == 5 and np.abs(images - want).max() <= IMAGE_TOL


@pytest.mark.slow
def test_bench_runs_the_packages_in_process(aoti_repo, tiny_ckpt, tiny_repo, tmp_path):
    """biva-bench's aoti backend: the packages beside torch.compile, with their ratio; a repository without
    packages is refused with a one-line reason."""
    from dataclasses import replace

    from biva_bench.config import QUICK
    from biva_bench.run import BenchError, run_bench

    cfg = replace(QUICK, threads=1, backends=("compile", "aoti"), cases=("sampler", "scorer_iw"),
                  measure=replace(QUICK.measure, window_s=0.05, max_windows=3))
    result = run_bench(tiny_ckpt, tmp_path / "out", cfg, repo=aoti_repo, log=lambda *_: None)
    for case in ("sampler", "scorer_iw"):
        cells = result["graphs"][case]["results"]["aoti"]
        assert all(m["images_per_s"] > 0 for m in cells.values()), case
    assert result["ratios"]["aoti_over_compile"]["sampler"]["64"]["value"] > 0
    with pytest.raises(BenchError, match="no AOTInductor package"):
        run_bench(tiny_ckpt, tmp_path / "out2", cfg, repo=tiny_repo, log=lambda *_: None)
