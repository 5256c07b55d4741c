"""Shared fixtures. Keep this file light: no torch, no server started at import or collection."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """An empty Triton model repository directory under tmp_path."""
    repo = tmp_path / "model_repository"
    repo.mkdir()
    return repo


# ---- shared, session-scoped: a tiny trained checkpoint, its exported repository, a live server ----
# Built once per test session (about a minute on 2 cores) and reused by every serving/client test.

@pytest.fixture(scope="session")
def digits_npy(tmp_path_factory) -> Path:
    """scikit-learn's digits at 28x28 as a uint8 .npy: small real images, on every machine."""
    import numpy as np

    from biva_core.data import load_raw

    p = tmp_path_factory.mktemp("digits") / "digits.npy"
    np.save(p, (load_raw("digits", limit=600)[:, 0] * 255).round().astype(np.uint8))
    return p


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, digits_npy) -> Path:
    """The `tiny` preset trained briefly on digits (enough for non-trivial, finite likelihoods)."""
    import torch

    from biva_core.config import preset
    from biva_core.train import TrainConfig, train

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tiny_ckpt")
    train(preset("tiny"), TrainConfig(data=f"npy:{digits_npy}", epochs=2, batch_size=32, ema=0.9), d / "tiny.pt", d)
    return d / "tiny.pt"


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, tiny_ckpt) -> Path:
    """biva-export of the tiny checkpoint (python backend, small graph batch so slicing is exercised)."""
    from serving_helpers import export_repo

    return export_repo(tmp_path_factory, tiny_ckpt, "tiny_repo", max_batch=64, front_instances=2)


@pytest.fixture(scope="session")
def tiny_server(tiny_repo, tmp_path_factory):
    """A real tritonserver serving the tiny repository on free loopback ports."""
    from serving_helpers import serve

    yield from serve(tiny_repo, tmp_path_factory, "tiny_server")
