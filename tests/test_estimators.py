"""The estimators of L_1 and L^{>k} (sample, mean of S draws, mode) and the OOD detector, without a server: the
contract's scoring plan against PyTorch's reference on fresh inputs, the kernel densities against scikit-learn's,
and the fitted file's round trip and refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biva_core.config import preset
from biva_core.contract import T, noise_rng
from biva_core.scoring import ScoreRequest, run_score
from biva_core.model import Biva
from biva_core.noise import NoiseStream
from biva_core.objectives import draw_log_weights, evaluate_bounds, evaluate_request, log_weights
from biva_core.stats import (DETECTOR, Detector, _kde_log_density, fit_detector, request_of, statistic_names,
                             statistics)

NATS_ATOL = 1e-3

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> Biva:
    torch.manual_seed(int(np.random.default_rng().integers(2**31)))
    return Biva(preset("tiny")).eval()


def _images(model: Biva, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, *model.cfg.image_shape)) < 0.4).astype(np.float32)


def _torch_exec(model: Biva):
    """The scorer's computation in PyTorch, as scoring.run_score calls a runtime."""
    def exec_calls(feeds, with_ks):
        with torch.no_grad():
            return [tuple(t.numpy() for t in draw_log_weights(model, torch.from_numpy(f[T.images]),
                                                              torch.from_numpy(f[T.noise]), torch.from_numpy(f[T.k])))
                    for f in feeds]
    return exec_calls


@pytest.mark.parametrize("req", [ScoreRequest("sample", 1, 7, (0, 1, 3)), ScoreRequest("mean", 5, 3, (1, 2)),
                                 ScoreRequest("mean", 3, 12, ()), ScoreRequest("mode", 1, 1, (1, 2), False),
                                 ScoreRequest("mode", 1, 6, (3,))])
def test_the_served_plan_equals_the_pytorch_reference(model, req) -> None:
    """scoring.run_score (what the front models run, here on the PyTorch scorer with 8 graph rows, so requests
    span blocks) against objectives.evaluate_request (chunks of 3 draws) on fresh images and seeds."""
    rng = np.random.default_rng()
    x, seed = _images(model, 4, int(rng.integers(2**31))), int(rng.integers(2**62))
    got = run_score(req, x, noise_rng(seed), model.noise_dim, 8, len(model.groups), _torch_exec(model))
    ref = evaluate_request(model, torch.from_numpy(x), NoiseStream(seed), req, chunk=3)
    assert np.abs(got[T.elbo] - ref.elbo.numpy()).max() <= NATS_ATOL
    assert np.abs(got[T.kl] - ref.kl.numpy()).max() <= NATS_ATOL
    for j, k in enumerate(req.ks):
        assert np.abs(got[T.l_gt_k][:, j] - ref.l_gt_k[k].numpy()).max() <= NATS_ATOL
    assert (T.iw_bound in got) == req.want_iw
    if req.want_iw:
        assert np.abs(got[T.iw_bound] - ref.iw.numpy()).max() <= NATS_ATOL


def test_each_estimator_is_what_it_says(model) -> None:
    """mean = the mean over S draws of log_weights on the stream's draws; mode = log_weights at zero noise (every
    latent at its mean); sample = the first draw; L_K the same whatever the estimator."""
    x = torch.from_numpy(_images(model, 3, 5))
    eps = NoiseStream(21).take((4, 3, model.noise_dim))  # (S, B, N), the stream's order
    with torch.no_grad():
        per = [log_weights(model, x, eps[s], 2) for s in range(4)]
        zero = log_weights(model, x, torch.zeros(3, model.noise_dim), 2)
        mean = evaluate_request(model, x, NoiseStream(21), ScoreRequest("mean", 4, 4, (2,)))
        mode = evaluate_request(model, x, NoiseStream(21), ScoreRequest("mode", 1, 4, (2,)))
        sample = evaluate_bounds(model, x, NoiseStream(21), 4, (2,))
    close = lambda a, b: float((a - b).abs().max()) <= NATS_ATOL  # noqa: E731
    assert close(mean.elbo, torch.stack([p[0] for p in per]).mean(0))
    assert close(mean.l_gt_k[2], torch.stack([p[1] for p in per]).mean(0))
    assert close(mode.elbo, zero[0]) and close(mode.l_gt_k[2], zero[1]) and close(mode.kl, zero[2])
    assert close(sample.elbo, per[0][0]) and close(sample.l_gt_k[2], per[0][1])
    assert close(mean.iw, mode.iw) and close(mean.iw, sample.iw)


def test_kernel_densities_match_scikit_learn() -> None:
    from sklearn.neighbors import KernelDensity

    rng = np.random.default_rng()
    points, z, h = rng.normal(0, 1, 700), rng.normal(0.3, 1.5, 50), float(rng.uniform(0.1, 0.6))
    from biva_core.stats import _kde_log_density

    ref = KernelDensity(bandwidth=h).fit(points[:, None]).score_samples(z[:, None])
    assert np.abs(_kde_log_density(z, points, h) - ref).max() <= 1e-9
    loo = _kde_log_density(points[:20], points, h, leave_out=True)  # each point without its own kernel
    ref_loo = [KernelDensity(bandwidth=h).fit(np.delete(points, i)[:, None]).score_samples(points[i:i + 1, None])[0]
               for i in range(20)]
    assert np.abs(loo - ref_loo).max() <= 1e-9


def _base(ks=(1, 2), groups=("z1_bu", "z1_td", "z2_bu", "z2_td", "z3")) -> Detector:
    return Detector(DETECTOR, "mode", 1, 1, ks, 0.0, 0.9, {"checkpoint_sha256": "ab" * 32}, {"data": "x", "n": 0},
                    names=tuple(statistic_names(groups, ks)))


def test_the_detector_flags_what_its_fitting_set_does_not_look_like() -> None:
    """Fitted on in-distribution statistics only: accepts about its TPR of fresh in-distribution draws (the
    threshold is scored leave-one-out), flags shifted ones, and survives its JSON file unchanged."""
    rng = np.random.default_rng()
    G, n = 5, 600
    def draws(m: int, shift: float) -> np.ndarray:  # noqa: E306
        elbo = rng.normal(-200 + shift, 20, m)
        lgk = elbo[:, None] - rng.normal([0, 5], [2, 4], (m, 2))  # L>k a little below L_1
        return statistics(elbo, rng.gamma(3, 1, (m, G)) + shift / 20, lgk)
    det = fit_detector(_base(), draws(n, 0), bandwidth=0.3)
    fresh, far = det.kde_scores(draws(2000, 0)), det.kde_scores(draws(500, 60))
    assert 0.86 <= float((fresh <= det.threshold).mean()) <= 0.94  # tpr 0.9
    assert float((far > det.threshold).mean()) > 0.95
    again = Detector.from_json(det.to_json())
    assert again == det and again.request() == ScoreRequest("mode", 1, 1, (1, 2), False)
    assert again.request() == request_of(again.summary())  # the served model's request, as the client reads it
    probe = draws(7, 10)  # the same numbers and code: equal by construction
    assert np.array_equal(again.kde_scores(probe), det.kde_scores(probe))
    # the points' array is made once and is the points: the densities straight from the tuples agree
    z = (probe - np.asarray(det.mean)) / np.asarray(det.std)
    direct = -sum(_kde_log_density(z[:, j], np.asarray(p), det.bandwidth) for j, p in enumerate(det.points))
    assert np.array_equal(det.kde_scores(probe), direct)


def test_a_fitted_file_is_checked_when_read() -> None:
    det = fit_detector(_base(), statistics(np.linspace(-1, 1, 40), np.ones((40, 5)) + np.arange(40)[:, None] / 40,
                                           np.zeros((40, 2))))
    doc = json.loads(det.to_json())
    for broken, match in (({**doc, "format": "other"}, "not a biva-ood-fit"),
                          ({**doc, "points": doc["points"][:3]}, "do not match"),
                          ({**doc, "score": "elbo"}, "unknown name")):
        with pytest.raises(ValueError, match=match):
            Detector.from_json(json.dumps(broken))
    with pytest.raises(ValueError, match="expected statistics"):
        fit_detector(_base(), np.zeros((10, 3)))
