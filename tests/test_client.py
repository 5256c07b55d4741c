"""biva-client against the real tiny server (HTTP and gRPC), checked against PyTorch with the same seeds.

Pure parts (metrics, threshold, grid, retries) run without a server; the rest share conftest's session
`tiny_server`. PyTorch references reuse the per-batch seeds the client sends: batch i -> seed + i.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from biva_client.api import BivaClient, ServerError, ServerUnavailable
from biva_client.cli import main
from biva_client.api import InputError
from biva_client.output import RowWriter, image_grid
from biva_client.tasks import batches, parse_k_list, sample_images
from biva_core.stats import (SCORE_NAMES, auprc, auroc, canonical_score, fit_threshold, fpr_at_tpr, needs_iw,
                              ood_scores, score_order)

PROTOCOLS = ["http", "grpc"]
IMG_ATOL = 1e-4  # served images vs PyTorch x_mean
NATS_ATOL = 1e-3  # served bounds vs PyTorch evaluate_request, per image


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    import torch

    from biva_core.checkpoint import load_model

    torch.set_num_threads(1)
    return load_model(tiny_ckpt)  # (model, data meta)


@pytest.fixture(params=PROTOCOLS)
def endpoint(request, tiny_server) -> list[str]:
    """Group options selecting the tiny server over one protocol."""
    url = tiny_server.http_url if request.param == "http" else tiny_server.grpc_url
    return ["--url", url, "--protocol", request.param, "--no-progress"]


@pytest.fixture(scope="module")
def inverted_npy(tmp_path_factory, digits_npy) -> Path:
    """White digits on black, inverted: an obvious out-of-distribution set for the digits model."""
    p = tmp_path_factory.mktemp("ood") / "inverted.npy"
    np.save(p, 255 - np.load(digits_npy)[:60])
    return p


def invoke(args: list[str]):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def served_requests(tiny_server) -> int:
    """Requests (successful or failed) the four front models have received so far."""
    import tritonclient.http as th

    c = th.InferenceServerClient(tiny_server.http_url)
    try:
        total = 0
        for role in ("sample", "regenerate", "encode", "score"):
            st = c.get_inference_statistics(f"biva_{role}")["model_stats"][0]["inference_stats"]
            total += st["success"]["count"] + st["fail"]["count"]
        return total
    finally:
        c.close()


def reference_bounds(model, x: np.ndarray, seed: int, batch_size: int, iw: int, ks=(), estimator: str = "sample",
                     samples: int = 1):
    """evaluate_request per batch with seed + i: what the client's requests compute."""
    import torch

    from biva_core.noise import NoiseStream
    from biva_core.scoring import ScoreRequest
    from biva_core.objectives import evaluate_request

    out = {"elbo": [], "iw": [], "kl": [], **{k: [] for k in ks}}
    for i, (a, b) in enumerate(batches(len(x), batch_size)):
        res = evaluate_request(model, torch.from_numpy(x[a:b]), NoiseStream(seed + i),
                               ScoreRequest(estimator, samples, iw, tuple(ks)))
        out["elbo"].append(res.elbo.numpy())
        out["iw"].append(res.iw.numpy())
        out["kl"].append(res.kl.numpy())
        for k in ks:
            out[k].append(res.l_gt_k[k].numpy())
    return {key: np.concatenate(v) for key, v in out.items()}


def digits_input(digits_npy: Path, data_meta: dict, limit: int) -> np.ndarray:
    from biva_core.data import load_for_model

    return load_for_model(f"npy:{digits_npy}", data_meta, limit)


# ---- pure: metrics, thresholds, grids, writers, retries -------------------------------------------

def test_metrics_match_hand_computed_values() -> None:
    # ranking: 0.8 (OOD) > 0.4 (in) > 0.35 (OOD) > 0.1 (in): 3 of 4 (OOD, in) pairs ordered right
    assert auroc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.75)
    # precision 1 at recall 1/2, 2/3 at recall 1: AP = 0.5 * 1 + 0.5 * 2/3
    assert auprc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(5 / 6)
    # detecting both OOD inputs needs threshold 0.35, which also flags 0.4: FPR 1/2
    assert fpr_at_tpr([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.5)
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0 and fpr_at_tpr([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.5)  # ties count half
    # 20 OOD scores 1..20 vs in-distribution 0.5 and 10.5: 95% TPR keeps 19 OOD -> threshold 2 -> flags 10.5
    assert fpr_at_tpr([0.5, 10.5], np.arange(1, 21)) == pytest.approx(0.5)


def test_threshold_accepts_the_requested_fraction() -> None:
    scores = np.arange(1.0, 21.0)  # 1..20
    t = fit_threshold(scores, 0.95)
    assert t == 19.0 and (scores > t).sum() == 1
    assert fit_threshold(scores, 1.0) == 20.0 and not (scores > 20.0).any()
    assert fit_threshold([3.0], 0.5) == 3.0


def test_score_names_and_k_lists() -> None:
    assert canonical_score("llr_gt2") == "LLR>2" and canonical_score("L>1") == "L>1"
    assert canonical_score("l1") == "L1" and canonical_score("LLRgt3") == "LLR>3"
    with pytest.raises(ValueError, match="unknown name"):
        canonical_score("elbo")
    assert canonical_score("detector") == "detector" and canonical_score("llrk_gt1") == "LLRK>1"
    assert parse_k_list("3,1,1", 3) == (1, 3) and parse_k_list(None, 4) == (1, 2, 3)
    with pytest.raises(InputError, match="out of range"):
        parse_k_list("0,5", 3)


def test_the_score_table_names_orders_and_flags_what_ood_scores_computes() -> None:
    """Every score ood_scores returns is a canonical name of SCORES, in SCORES' order (k ascending within a kind),
    and exactly those that need iw = K > 1 come and go with the importance-weighted bound."""
    rng = np.random.default_rng()
    n, ks = 5, (3, 1)
    elbo, lgk, iw = -rng.uniform(100, 200, n), -rng.uniform(100, 200, (n, 2)), -rng.uniform(100, 200, n)
    kl = rng.uniform(0, 20, (n, 4))
    one, with_iw = ood_scores(elbo, kl, lgk, ks), ood_scores(elbo, kl, lgk, ks, iw)
    assert all(canonical_score(name) == name for name in with_iw)
    assert {m for m in with_iw if needs_iw(m)} == set(with_iw) - set(one) == {"LK", "LLRK>1", "LLRK>3"}
    np.testing.assert_allclose(one["LLR>3"], elbo - lgk[:, 0], rtol=1e-12)
    np.testing.assert_allclose(one["KL"], kl[:, 0] + kl[:, 1] + kl[:, 2] + kl[:, 3], rtol=1e-12)  # the rate
    assert sorted(with_iw, key=score_order) == ["L1", "LK", "KL", "L>1", "L>3", "LLR>1", "LLR>3", "LLRK>1",
                                                 "LLRK>3"]
    assert SCORE_NAMES[-1] == "detector" and score_order("detector") > score_order("LLRK>12") > score_order("LLRK>3")


def test_ood_fit_refuses_a_score_that_needs_iw_without_it_before_calling_the_server(tmp_path) -> None:
    """No server listens on the URL: the refusal must come from the command line check, in one line."""
    out = tmp_path / "fit.json"
    for score in ("LK", "llrk_gt1"):
        r = invoke(["--url", "127.0.0.1:9", "ood", "fit", "--in", "digits", "--score", score, "--out", out])
        assert r.exit_code == 2 and "needs --iw K with K >= 2" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_image_grid_layout() -> None:
    x = np.random.default_rng(0).random((10, 1, 5, 7)).astype(np.float32)
    g = image_grid(x, pad=1)  # 4 columns, 3 rows
    assert g.shape == (3 * 6 + 1, 4 * 8 + 1) and g.dtype == np.uint8
    assert np.array_equal(g[1:6, 1:8], (x[0, 0] * 255).round().astype(np.uint8))
    assert np.array_equal(g[7:12, 9:16], (x[5, 0] * 255).round().astype(np.uint8))  # row 1, column 1
    assert image_grid(np.zeros((2, 3, 1, 4, 4), np.float32)).shape == (2 * 6 + 2, 3 * 6 + 2)  # (rows, k, C, H, W)


def test_row_writer_keeps_valid_json_when_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        with RowWriter(path, ["a"]) as w:
            w.write([{"a": 1}, {"a": 2}])
            raise KeyboardInterrupt
    assert json.loads(path.read_text()) == [{"a": 1}, {"a": 2}]


class _FakeTriton:
    def close(self) -> None:
        pass


def test_transient_failures_are_retried_with_backoff(monkeypatch) -> None:
    from tritonclient.utils import InferenceServerException

    sleeps: list[float] = []
    monkeypatch.setattr("biva_client.api.time.sleep", sleeps.append)
    client = BivaClient("127.0.0.1:1", retries=3, backoff=0.1)
    monkeypatch.setattr(client, "_client", lambda: _FakeTriton())
    failures = [ConnectionRefusedError(111, "Connection refused"), InferenceServerException("busy", status="503")]

    def flaky(_):
        if failures:
            raise failures.pop(0)
        return "ok"

    assert client._retry(flaky, "test") == "ok"
    assert sleeps == [0.1, 0.2]

    def bad_request(_):
        raise InferenceServerException("n: got 0, expected a value in 1..1024", status="400")

    with pytest.raises(ServerError, match="n: got 0") as info:
        client._retry(bad_request, "test")
    assert info.value.exit_code == 1 and sleeps == [0.1, 0.2]  # a bad request is not retried

    def down(_):
        raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(ServerUnavailable, match="after 4 tries"):
        client._retry(down, "test")
    assert sleeps[2:] == [0.1, 0.2, 0.4]


def test_help_on_every_command() -> None:
    for args in ([], ["sample"], ["likelihood"], ["ood"], ["ood", "score"], ["ood", "fit"], ["ood", "check"],
                 ["ood", "detect"], ["reconstruct"], ["encode"]):
        result = invoke([*args, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output


# ---- against the server ---------------------------------------------------------------------------

@pytest.mark.server
def test_sample_is_reproducible_and_matches_pytorch(endpoint, tmp_path, tiny_model) -> None:
    import torch

    from biva_core.noise import NoiseStream

    model, _ = tiny_model
    runs = []
    for name in ("a", "b"):
        r = invoke([*endpoint, "sample", "--n", 10, "--seed", 7, "--temperature", 0.8,
                    "--out", tmp_path / f"{name}.png", "--npy", tmp_path / f"{name}.npy"])
        assert r.exit_code == 0, r.output
        runs.append(np.load(tmp_path / f"{name}.npy"))
    # the same request twice: the same noise through the same graph at the same row count, equal by construction
    assert runs[0].shape == (10, 1, 28, 28) and np.array_equal(runs[0], runs[1])
    with torch.no_grad():
        ref = model.sample(NoiseStream(7).take((10, model.latent_dim)), 0.8).x_mean.numpy()
    assert np.abs(runs[0] - ref).max() <= IMG_ATOL
    with Image.open(tmp_path / "a.png") as im:  # 10 tiles: 4 columns x 3 rows of 28 px + 2 px padding
        assert im.size == (4 * 30 + 2, 3 * 30 + 2)


@pytest.mark.server
def test_sample_above_the_cap_splits_with_derived_seeds(tiny_server, tiny_model) -> None:
    import torch

    from biva_core.noise import NoiseStream

    model, _ = tiny_model
    with BivaClient(tiny_server.grpc_url, "grpc") as client:
        client._meta = dataclasses.replace(client.meta, caps=dataclasses.replace(client.meta.caps, max_n=4))
        # a pretended small cap: 10 = 4 + 4 + 2, seeds 3, 4, 5
        images = sample_images(client, 10, seed=3)
        assert client.requests_sent == 3
    with torch.no_grad():
        ref = np.concatenate([model.sample(NoiseStream(3 + j).take((m, model.latent_dim))).x_mean.numpy()
                              for j, m in enumerate((4, 4, 2))])
    assert np.abs(images - ref).max() <= IMG_ATOL


@pytest.mark.server
@pytest.mark.parametrize("iw,fmt", [(1, "csv"), (8, "json")])
def test_likelihood_matches_pytorch_per_image(endpoint, tmp_path, tiny_model, digits_npy, iw, fmt) -> None:
    model, data_meta = tiny_model
    out = tmp_path / f"ll.{fmt}"
    r = invoke([*endpoint, "--batch-size", 16, "--concurrency", 2, "likelihood", "--data", f"npy:{digits_npy}",
                "--limit", 40, "--iw", iw, "--seed", 5, "--out", out])
    assert r.exit_code == 0, r.output
    if fmt == "csv":
        with out.open() as f:
            rows = list(csv.DictReader(f))
    else:
        rows = json.loads(out.read_text())
    expected_cols = (["index", "seed", "l1_nats", "l1_bpd"] + (["iw", "lk_nats", "lk_bpd"] if iw > 1 else [])
                     + ["kl_nats"])
    assert list(rows[0]) == expected_cols and len(rows) == 40
    assert [int(r_["index"]) for r_ in rows] == list(range(40))
    assert [int(r_["seed"]) for r_ in rows] == [5] * 16 + [6] * 16 + [7] * 8  # batch i -> seed + i
    ref = reference_bounds(model, digits_input(digits_npy, data_meta, 40), 5, 16, iw)
    l1 = np.array([float(r_["l1_nats"]) for r_ in rows])
    assert np.abs(l1 - ref["elbo"]).max() <= NATS_ATOL
    assert np.allclose([float(r_["l1_bpd"]) for r_ in rows], -l1 / (784 * np.log(2)), rtol=1e-6)
    if iw > 1:
        assert np.abs(np.array([float(r_["lk_nats"]) for r_ in rows]) - ref["iw"]).max() <= NATS_ATOL
        assert "L_K" in r.stdout
    assert "L_1" in r.stdout and "(n = 40)" in r.stdout
    assert f"{ref['elbo'].mean():.2f}" in r.stdout  # the summary's mean


@pytest.mark.server
def test_ood_score_table_and_plot(tiny_server, tmp_path, digits_npy, inverted_npy, tiny_model) -> None:
    model, data_meta = tiny_model
    plot = tmp_path / "ood.png"
    r = invoke(["--url", tiny_server.grpc_url, "--protocol", "grpc", "--no-progress", "--batch-size", 32,
                "ood", "score", "--in", f"npy:{digits_npy}", "--ood", f"npy:{inverted_npy}", "--limit", 50,
                "--k", "1,2", "--json", "--plot", plot])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout.splitlines()[0])
    table = doc["metrics"]
    assert list(table) == ["L1", "KL", "L>1", "L>2", "LLR>1", "LLR>2"] and doc["estimator"] == "mode"  # the default
    for m in table.values():
        assert all(0.0 <= m[key] <= 1.0 for key in ("auroc", "auprc", "fpr95"))
    assert table["L1"]["auroc"] > 0.9  # inverted digits are far from anything the model has seen
    # the table's LLR>2 AUROC from PyTorch with the mode estimator (deterministic: no seeds)
    ref_in = reference_bounds(model, digits_input(digits_npy, data_meta, 50), 0, 32, 1, (2,), "mode")
    ref_ood = reference_bounds(model, digits_input(inverted_npy, data_meta, 50), 0, 32, 1, (2,), "mode")
    expected = auroc(ref_in["elbo"] - ref_in[2], ref_ood["elbo"] - ref_ood[2])
    assert table["LLR>2"]["auroc"] == pytest.approx(expected, abs=1e-3)
    with Image.open(plot) as im:
        assert im.size[0] > 300 and im.size[1] > 200


@pytest.mark.server
def test_ood_fit_then_check(tiny_server, tmp_path, digits_npy, inverted_npy) -> None:
    common = ["--url", tiny_server.http_url, "--no-progress", "--batch-size", 20]
    threshold = tmp_path / "threshold.json"
    r = invoke([*common, "ood", "fit", "--in", f"npy:{digits_npy}", "--limit", 40, "--score", "LLR_gt1",
                "--tpr", 0.9, "--out", threshold])
    assert r.exit_code == 0, r.output
    doc = json.loads(threshold.read_text())
    assert doc["score"] == "LLR>1" and doc["fitted_on"]["n"] == 40 and doc["estimator"] == "mode"
    assert doc["model"]["checkpoint_sha256"] and doc["ks"] == [1]

    # the calibration set itself, with the same seeds: at most 10% flagged, exit 3 if any
    out = tmp_path / "check.csv"
    r = invoke([*common, "ood", "check", "--threshold", threshold, "--data", f"npy:{digits_npy}", "--limit", 40,
                "--out", out])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    n_flagged = sum(int(row["flagged"]) for row in rows)
    assert len(rows) == 40 and 1 <= n_flagged <= 4
    assert all((float(row["score"]) > doc["threshold"]) == bool(int(row["flagged"])) for row in rows)
    assert r.exit_code == 3 and f"{n_flagged} of 40 inputs flagged" in r.stderr

    # nothing above a huge threshold: exit 0, per-image CSV on stdout
    doc["threshold"] = 1e9
    threshold.write_text(json.dumps(doc))
    r = invoke([*common, "ood", "check", "--threshold", threshold, "--data", f"npy:{inverted_npy}", "--limit", 5])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "index,score,flagged" and len(r.stdout.splitlines()) == 6

    # L1 calibrated on digits flags (nearly) all inverted digits
    r = invoke([*common, "ood", "fit", "--in", f"npy:{digits_npy}", "--limit", 40, "--score", "L1", "--out",
                threshold])
    assert r.exit_code == 0, r.output
    r = invoke([*common, "ood", "check", "--threshold", threshold, "--data", f"npy:{inverted_npy}", "--limit", 20])
    assert r.exit_code == 3
    assert sum(line.endswith(",1") for line in r.stdout.splitlines()[1:]) >= 18

    # the rate (KL) fitted on 40 digits: checked on the same digits (mode: deterministic), at most 5% flagged
    r = invoke([*common, "ood", "fit", "--in", f"npy:{digits_npy}", "--limit", 40, "--score", "kl", "--out",
                threshold])
    assert r.exit_code == 0 and json.loads(threshold.read_text())["score"] == "KL", r.output
    r = invoke([*common, "ood", "check", "--threshold", threshold, "--data", f"npy:{digits_npy}", "--limit", 40])
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 40 and sum(line.endswith(",1") for line in rows) <= 2 and min(
        float(line.split(",")[1]) for line in rows) > 0  # a sum of KL divergences


@pytest.mark.server
def test_encode_matches_pytorch(tiny_server, tmp_path, digits_npy, tiny_model) -> None:
    import torch

    from biva_core.noise import NoiseStream

    model, data_meta = tiny_model
    out = tmp_path / "latents.npz"
    r = invoke(["--url", tiny_server.grpc_url, "--protocol", "grpc", "--no-progress", "encode", "--data",
                f"npy:{digits_npy}", "--limit", 30, "--batch-size", 16, "--seed", 2, "--out", out])
    assert r.exit_code == 0, r.output
    d = np.load(out)
    D, G = model.latent_dim, len(model.groups)
    assert d["q_mu"].shape == d["q_log_std"].shape == d["z"].shape == (30, D) and d["kl"].shape == (30, G)
    assert list(d["groups"]) == model.group_names() and list(d["seeds"]) == [2] * 16 + [3] * 14
    x = digits_input(digits_npy, data_meta, 30)
    with torch.no_grad():
        ref = [model(torch.from_numpy(x[a:b]), NoiseStream(2 + i).take((b - a, model.noise_dim)))
               for i, (a, b) in enumerate(batches(30, 16))]
    for key in ("q_mu", "q_log_std", "z"):
        assert np.abs(d[key] - np.concatenate([getattr(p, key).numpy() for p in ref])).max() <= IMG_ATOL


@pytest.mark.server
def test_reconstruct_grid(tiny_server, tmp_path, digits_npy, tiny_model) -> None:
    import torch

    from biva_core.noise import NoiseStream

    model, data_meta = tiny_model
    png, npy = tmp_path / "rec.png", tmp_path / "rec.npy"
    r = invoke(["--url", tiny_server.http_url, "--no-progress", "reconstruct", "--data", f"npy:{digits_npy}",
                "--limit", 3, "--k", "0,2", "--seed", 4, "--out", png, "--npy", npy])
    assert r.exit_code == 0, r.output
    stack = np.load(npy)
    x = digits_input(digits_npy, data_meta, 3)
    assert stack.shape == (3, 3, 1, 28, 28) and np.array_equal(stack[:, 0], x)  # input first
    with Image.open(png) as im:  # 3 rows x (input + 2 labelled k), wider than tall
        assert im.size[0] >= im.size[1] > 100
    with torch.no_grad():
        z = model(torch.from_numpy(x), NoiseStream(4).take((3, model.noise_dim))).z
        ref = model.regenerate(z, 2, NoiseStream(4).take((3, model.latent_dim))).x_mean.numpy()
    assert np.abs(stack[:, 2] - ref).max() <= IMG_ATOL


# ---- failures -------------------------------------------------------------------------------------

def _one_line_error(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.server
def test_wrong_image_shape_fails_before_any_request(endpoint, tiny_server) -> None:
    before = served_requests(tiny_server)
    r = invoke([*endpoint, "likelihood", "--data", "digits:32", "--limit", 5])
    assert r.exit_code == 2
    assert "(N, 1, 28, 28)" in _one_line_error(r)
    r = invoke([*endpoint, "reconstruct", "--data", "digits:32"])
    assert r.exit_code == 2
    assert served_requests(tiny_server) == before


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_server_is_one_line(protocol) -> None:
    from serving_helpers import free_port

    r = invoke(["--url", f"127.0.0.1:{free_port()}", "--protocol", protocol, "--retries", 1, "sample", "--n", 4])
    assert r.exit_code == 4
    assert "cannot reach Triton" in _one_line_error(r)


@pytest.mark.server
def test_timeout_is_one_line(tiny_server, digits_npy) -> None:
    r = invoke(["--url", tiny_server.http_url, "--timeout", 0.001, "likelihood", "--data", f"npy:{digits_npy}",
                "--limit", 20, "--iw", 50])
    assert r.exit_code == 5 and "within 0.001 s" in _one_line_error(r)


@pytest.mark.server
def test_model_not_ready_and_server_error(tiny_server) -> None:
    r = invoke(["--url", tiny_server.http_url, "--model-prefix", "nope_", "sample"])
    assert r.exit_code == 4 and "'nope_sample' is not ready" in _one_line_error(r)
    with BivaClient(tiny_server.http_url) as client:  # past the client's checks: the server's own message
        with pytest.raises(ServerError, match="temperature"):
            client._infer("sample", {"n": np.array([2], np.int64), "temperature": np.array([-1.0], np.float32)},
                          ["images"])


@pytest.mark.server
def test_ctrl_c_exits_130_and_keeps_rows(tiny_server, tmp_path, digits_npy) -> None:
    out = tmp_path / "ll.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--url", tiny_server.http_url, "--no-progress", "--batch-size", 10, "--concurrency", 1, "likelihood",
            "--data", f"npy:{digits_npy}", "--iw", 400, "--out", out]
    proc = subprocess.Popen(
        [sys.executable, "-m", "biva_client.cli", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while (not out.exists() or out.read_text().count("index") < 10) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    rows = json.loads(out.read_text())  # still valid JSON
    assert 10 <= len(rows) < 600 and [r["index"] for r in rows] == list(range(len(rows)))
