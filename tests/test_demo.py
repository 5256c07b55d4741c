"""`make demo`'s whole path (export, serve, sample, score, OOD, reconstruct) on the tiny checkpoint.

Its pieces are checked against PyTorch in test_client; here the point is that the steps fit together, that
every output is written and consistent with the others, and that the server is gone afterwards.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from biva_demo.demo import DemoConfig, run_demo
from biva_core.checkpoint import sha256_file


def _mode_l1(ckpt, npy, n: int) -> np.ndarray:
    import torch

    from biva_core.checkpoint import load_model
    from biva_core.data import load_for_model
    from biva_core.noise import NoiseStream
    from biva_core.scoring import ScoreRequest
    from biva_core.objectives import evaluate_request

    model, meta = load_model(ckpt)
    x = torch.from_numpy(load_for_model(f"npy:{npy}", meta, n))
    return evaluate_request(model, x, NoiseStream(0), ScoreRequest("mode", want_iw=False)).elbo.numpy()


@pytest.mark.slow
def test_demo_end_to_end(tiny_ckpt, digits_npy, tmp_path, monkeypatch):
    import biva_serving.process as launcher

    servers = []
    start = launcher.start_server
    monkeypatch.setattr(launcher, "start_server", lambda *a, **kw: servers.append(start(*a, **kw)) or servers[-1])
    inverted = tmp_path / "inverted.npy"
    np.save(inverted, 255 - np.load(digits_npy)[:40])  # white on black: far out of the digits distribution

    out, repo = tmp_path / "demo_out", tmp_path / "triton_models"
    cfg = DemoConfig(n_samples=16, ll_limit=40, ood_limit=40, k_list="1,2", in_spec=f"npy:{digits_npy}",
                     ood_specs=(f"npy:{inverted}", "mnist"), batch_size=16, progress=False,
                     runtime="onnxruntime")
    outputs = run_demo(tiny_ckpt, out, repo, cfg)

    for what, path in outputs.items():
        assert path.exists(), what
    report = json.loads((repo / "export_report.json").read_text())
    # the report names the user's checkpoint, not the private snapshot the demo exported from
    assert report["checkpoint"] == str(tiny_ckpt)
    assert report["meta"]["checkpoint_sha256"] == sha256_file(tiny_ckpt) and report["validated"]

    with Image.open(out / "samples.png") as im:
        w, h = im.size
    assert w >= 4 * 28 and h >= 4 * 28  # a grid of 16 28x28 samples

    with open(out / "likelihood.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(40))
    l1 = np.array([float(r["l1_nats"]) for r in rows])
    assert np.isfinite(l1).all() and (l1 < 0).all()
    summary = json.loads((out / "likelihood_summary.json").read_text())
    assert summary["L1_nats"]["n"] == 40
    assert abs(summary["L1_nats"]["mean"] - l1.mean()) < 1e-3

    ood = json.loads((out / "ood_metrics.json").read_text())
    assert list(ood["sets"]) == [f"npy:{inverted}", "mnist"] and ood["estimator"] == "mode"
    inv = ood["sets"][f"npy:{inverted}"]
    assert set(inv) == set(ood["sets"]["mnist"]) == {"L1", "KL", "L>1", "L>2", "LLR>1", "LLR>2"}  # no served detector
    # the in-distribution images are the likelihood step's, scored by the mode estimator: PyTorch's values
    ref = _mode_l1(tiny_ckpt, digits_npy, 40)
    assert abs(inv["L1"]["mean_in"] + ref.mean()) < 1e-3 and abs(ref.mean() - l1.mean()) > 1e-3  # not L_1's draws
    assert abs(ood["sets"]["mnist"]["L1"]["mean_in"] - inv["L1"]["mean_in"]) < 1e-9  # scored once
    assert inv["L1"]["auroc"] > 0.9  # inverted digits are obvious outliers for this model
    assert (out / "ood_mnist.png").exists() and len(list(out.glob("ood_npy_*inverted.npy.png"))) == 1
    assert "OOD: mnist (40)" in (out / "ood_table.txt").read_text()

    with Image.open(out / "reconstructions.png") as im:
        assert im.size[1] >= 8 * 28  # one row per input, 8 inputs

    assert len(servers) == 1 and servers[0].process.poll() is not None  # the demo stopped its server
