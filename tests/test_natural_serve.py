"""The natural-image path end to end: `tiny32` (32x32x3, PixelCNN++'s coupled logistic mixture, natural32's
structure at test width) trained briefly on colour images this test makes, exported with validation at the
usual tolerances, served by a real tritonserver, and its samples, encodings and scores checked against
PyTorch for the same seeds."""
from pathlib import Path

import numpy as np
import pytest
import torch

from biva_core.checkpoint import load_model
from biva_core.config import preset
from biva_core.noise import NoiseStream
from biva_core.objectives import evaluate_bounds
from biva_core.contract import ENCODE, IMAGE_ATOL, NATS_ATOL, REPORT, SAMPLE, SCORE, ModelMeta
from serving_helpers import export_repo, i64, infer, serve

torch.set_num_threads(1)
# A float32 log-likelihood can be held to NATS_ATOL (1e-3 nats) only below 2^14 nats, where its spacing
# is 2^-10; 32x32x3 at 8 bits/dim is 17,035 nats, so the images scored here must beat 7.7 bits/dim.
FLOAT32_EXACT_NATS = 2.0**14


def _colour_images(n: int, seed: int) -> np.ndarray:
    """Smooth 8-bit colour images, (n, 3, 32, 32) uint8: a tint per image plus a few plane waves shared
    by the channels, and a little pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
    out = np.empty((n, 3, 32, 32))
    for i in range(n):
        wave = sum(rng.uniform(0.3, 1) * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * yy + rng.uniform(0.5, 3) * xx)
                                                + rng.uniform(0, 2 * np.pi)) for _ in range(3))
        out[i] = rng.uniform(0.2, 0.8, (3, 1, 1)) + 0.15 * wave + 0.01 * rng.standard_normal((3, 32, 32))
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def nat_ckpt(tmp_path_factory) -> Path:
    """tiny32 trained for 6 short epochs (about 25 s): about 6.9 bits/dim on these images, enough for the
    scores below to stay under FLOAT32_EXACT_NATS."""
    from biva_core.train import TrainConfig, train

    d = tmp_path_factory.mktemp("tiny32")
    np.save(d / "train.npy", _colour_images(400, seed=0))
    train(preset("tiny32"), TrainConfig(data=f"npy:{d / 'train.npy'}", binarize="8bit", epochs=6, batch_size=16,
                                        lr=8e-3, ema=0.9), d / "tiny32.pt", d)
    return d / "tiny32.pt"


@pytest.fixture(scope="module")
def nat_repo(tmp_path_factory, nat_ckpt) -> Path:
    return export_repo(tmp_path_factory, nat_ckpt, "tiny32_repo", max_batch=8, front_instances=1)


@pytest.fixture(scope="module")
def nat_server(nat_repo, tmp_path_factory):
    yield from serve(nat_repo, tmp_path_factory, "tiny32_server")


@pytest.fixture(scope="module")
def nat_model(nat_ckpt):
    return load_model(nat_ckpt)[0]


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    """Images the model never saw, as the server takes them: float32 in [0, 1] on the 8-bit grid."""
    return (_colour_images(5, seed=1) / 255).astype(np.float32)


@pytest.mark.parametrize("name,rows,images", [("natural32", 64, 64), ("natural64", 64, 64),
                                               ("default28", 1024, 1024), ("tiny", 1024, 1024), ("tiny32", 1024, 1024)])
def test_export_sizes_graph_batches_and_caps_to_memory(name, rows, images):
    """natural32's rows carry 2.7 MiB of tensors: with the default two instances per graph its graphs get 64
    rows per call (128 with one instance) and requests 64 images (binary models keep the defaults); an
    explicit smaller setting is kept."""
    from biva_core.model import Biva
    from biva_core.contract import Caps
    from biva_export.pipeline import ExportConfig, fit_to_memory
    from biva_export.serving_config import ServingConfig

    m = Biva(preset(name))
    got = fit_to_memory(ExportConfig(), m.latent_dim, m.noise_dim, m.cfg.image_shape)
    assert (got.serving.max_batch, got.caps.max_images) == (rows, images)
    assert got.caps.max_n == Caps().max_n and got.caps.max_rows == Caps().max_rows
    one = fit_to_memory(ExportConfig(serving=ServingConfig(instances=1)), m.latent_dim, m.noise_dim, m.cfg.image_shape)
    assert one.serving.max_batch == min(2 * rows, 1024)  # one instance: the whole row budget
    small = ExportConfig(serving=ServingConfig(max_batch=8), caps=Caps(max_images=4))
    kept = fit_to_memory(small, m.latent_dim, m.noise_dim, m.cfg.image_shape)
    assert (kept.serving.max_batch, kept.caps.max_images) == (8, 4)


def test_natural_export_validates_at_the_usual_tolerances(nat_repo):
    import json

    report = json.loads((nat_repo / REPORT).read_text())
    meta = ModelMeta.from_json(json.dumps(report["meta"]))
    assert meta.likelihood == "dmol" and meta.image_shape == (3, 32, 32) and meta.binarize == "8bit"
    for name, g in report["graphs"].items():
        assert g["ok"], (name, g["max_abs_diff"])
        for out, tol in g["atol"].items():  # the same tolerances as every other model: no scaling, except
            # that a tolerance below two float32 spacings of the value (0.002 nats at 16,384-32,768) is raised
            base = IMAGE_ATOL if out in ("images", "z_out", "z", "q_mu", "q_log_std") else NATS_ATOL
            assert tol == base or base < tol <= 2 * float(np.spacing(np.float32(2.0**15))), (name, out, tol)
            assert g["max_abs_diff"][out] <= tol


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_natural_sample_matches_pytorch(nat_server, nat_model, protocol):
    imgs, seed = infer(nat_server, protocol, SAMPLE, {"n": i64(3), "seed": i64(21)}, ["images", "seed"])
    with torch.no_grad():
        ref = nat_model.sample(NoiseStream(21).take((3, nat_model.latent_dim))).x_mean.numpy()
    assert imgs.shape == (3, 3, 32, 32) and seed[0] == 21
    assert np.abs(imgs - ref).max() <= IMAGE_ATOL
    assert 0 <= imgs.min() and imgs.max() <= 1 and imgs.std() > 0


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_natural_score_and_encode_match_pytorch(nat_server, nat_model, held_out, protocol):
    ks = [0, 1]  # L^{>2}, L^{>3} of this briefly trained model reach past 2^14 nats on some images
    elbo, iw, lgk, kl = infer(nat_server, protocol, SCORE,
                               {"images": held_out, "iw": i64(3), "ks": i64(ks), "seed": i64(9)},
                               ["elbo", "iw_bound", "l_gt_k", "kl"])
    assert (np.abs(lgk) < FLOAT32_EXACT_NATS).all(), lgk  # the model learned enough for 1e-3 nats to exist
    ref = evaluate_bounds(nat_model, torch.from_numpy(held_out), NoiseStream(9), 3, tuple(ks))
    assert np.abs(elbo - ref.elbo.numpy()).max() <= NATS_ATOL
    assert np.abs(iw - ref.iw.numpy()).max() <= NATS_ATOL
    for j, k in enumerate(ks):
        assert np.abs(lgk[:, j] - ref.l_gt_k[k].numpy()).max() <= NATS_ATOL
    assert np.abs(kl - ref.kl.numpy()).max() <= NATS_ATOL
    z, mu = infer(nat_server, protocol, ENCODE, {"images": held_out, "seed": i64(4)}, ["z", "q_mu"])
    with torch.no_grad():
        out = nat_model(torch.from_numpy(held_out), NoiseStream(4).take((len(held_out), nat_model.noise_dim)))
    assert np.abs(z - out.z.numpy()).max() <= IMAGE_ATOL and np.abs(mu - out.q_mu.numpy()).max() <= IMAGE_ATOL
