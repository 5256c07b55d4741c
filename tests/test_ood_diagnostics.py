"""Issue 9's training levers (KL warm-up, compiled step) and OOD diagnostics (AUROC, active units, biva-eval --ood)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from biva_core.config import preset
from biva_core.evaluate import active_units, main as eval_main
from biva_core.stats import detection_table, ood_scores
from biva_core.model import Biva
from biva_core.objectives import training_loss
from biva_core.train import TrainConfig, kl_weight, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory, digits_npy):
    d = tmp_path_factory.mktemp("ood_run")
    train(preset("tiny"), TrainConfig(data=f"npy:{digits_npy}", epochs=2, batch_size=32, kl_warmup=1.0,
                                      keep_epochs=True), d / "m.pt", d)
    return d


def test_kl_weight_ramps_linearly_then_stays_at_one():
    assert [kl_weight(2.0, p) for p in (0.0, 0.5, 1.0, 2.0, 7.0)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert kl_weight(0.0, 0.0) == 1.0  # no warm-up


def test_beta_scales_only_the_kl_term():
    torch.manual_seed(0)
    model = Biva(preset("tiny")).eval()
    x = (torch.rand(8, 1, 28, 28) > 0.5).float()
    eps = torch.randn(8, model.noise_dim)
    full, st = training_loss(model, x, eps, torch.tensor(0.0), torch.tensor(1.0))
    none, _ = training_loss(model, x, eps, torch.tensor(0.0), torch.tensor(0.0))
    half, _ = training_loss(model, x, eps, torch.tensor(0.0), torch.tensor(0.5))
    kl = st["kl"]
    assert abs((full - none).item() - kl.item()) < 1e-3 and abs((half - none).item() - 0.5 * kl.item()) < 1e-3
    assert kl.item() > 0.1  # so the comparisons above could fail


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    """torch.compile of the step gives the eager loss and gradients (1e-4 relative) on fresh inputs."""
    torch.manual_seed(1)
    model = Biva(preset("tiny")).eval()  # eval: no dropout draws, so both runs see the same function
    x = (torch.rand(16, 1, 28, 28) > 0.5).float()
    eps = torch.randn(16, model.noise_dim)
    args = (torch.tensor(2.0), torch.tensor(0.7))
    grads = []
    for fn in (training_loss, torch.compile(training_loss)):
        model.zero_grad()
        loss, _ = fn(model, x, eps, *args)
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (l0, g0), (l1, g1) = grads
    assert abs(l0 - l1) <= 1e-4 * abs(l0), (l0, l1)
    assert (g0 - g1).abs().max() <= 1e-4 * g0.abs().max() + 1e-6
    assert g0.abs().max() > 0


def test_warmup_run_logs_the_kl_weight_and_keeps_epoch_snapshots(tiny_trained):
    log = [json.loads(line) for line in (tiny_trained / "log.jsonl").read_text().splitlines()]
    # warm-up over 1 epoch: the last step of epoch 1 has beta = (n - 1) / n, epoch 2 has beta = 1
    assert 0.5 < log[0]["kl_weight"] < 1.0 and log[1]["kl_weight"] == 1.0
    assert sorted(p.name for p in tiny_trained.glob("epoch_*.pt")) == ["epoch_1.pt", "epoch_2.pt"]
    assert log[1]["minutes"] >= log[0]["minutes"] > 0


def test_ood_aurocs_equal_the_pairwise_definition():
    rng = np.random.default_rng(0)
    a = {"elbo": rng.normal(-100, 5, 60), "l_gt_1": rng.normal(-120, 5, 60), "kl": rng.gamma(4, 5, (60, 3))}
    b = {"elbo": rng.normal(-110, 5, 40), "l_gt_1": rng.normal(-125, 5, 40), "kl": rng.gamma(5, 5, (40, 3))}
    table = detection_table(ood_scores(a["elbo"], a["kl"], a["l_gt_1"][:, None], (1,)),
                            ood_scores(b["elbo"], b["kl"], b["l_gt_1"][:, None], (1,)))
    got = {name: m["auroc"] for name, m in table.items()}

    def pairwise(s_in, s_ood):  # P(score_ood > score_in) + 0.5 P(tie)
        d = s_ood[:, None] - s_in[None, :]
        return float((d > 0).mean() + 0.5 * (d == 0).mean())

    assert got["L1"] == pytest.approx(pairwise(-a["elbo"], -b["elbo"]), abs=1e-12)
    assert got["KL"] == pytest.approx(pairwise(a["kl"].sum(1), b["kl"].sum(1)), abs=1e-12)
    assert got["L>1"] == pytest.approx(pairwise(-a["l_gt_1"], -b["l_gt_1"]), abs=1e-12)
    llr = pairwise(a["elbo"] - a["l_gt_1"], b["elbo"] - b["l_gt_1"])
    assert got["LLR>1"] == pytest.approx(llr, abs=1e-12)
    assert got["L1"] > 0.8  # OOD drawn less likely, so the score separates


def test_active_units_count_posterior_means_that_move_with_the_input():
    torch.manual_seed(0)
    model = Biva(preset("tiny")).eval()
    rng = np.random.default_rng(0)
    varied = (rng.random((64, 1, 28, 28)) > 0.5).astype(np.float32)
    same = np.repeat(varied[:1], 64, axis=0)
    assert sum(active_units(model, same).values()) == 0  # one image: no unit can vary
    counts = active_units(model, varied, threshold=1e-6)
    assert counts.keys() == set(model.group_names()) and sum(counts.values()) > 0
    assert all(0 <= counts[n] <= g.size for n, g in zip(model.group_names(), model.groups))


def test_biva_eval_ood_reports_auroc_kl_and_histograms(tiny_trained, tmp_path):
    res = CliRunner().invoke(eval_main, ["--ckpt", str(tiny_trained / "m.pt"), "--data", "digits", "--limit", "40",
                                         "--k", "1,2", "--ood", "mnist", "--ood", "digits:28", "--active-units",
                                         "--hist", str(tmp_path / "h.png"), "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out["ood"]) == {"mnist", "digits:28"}
    mn = out["ood"]["mnist"]
    assert set(mn["auroc"]) == {"L1", "KL", "L>1", "L>2", "LLR>1", "LLR>2"} and mn["n_images"] == 40
    assert len(mn["kl_per_layer"]) == 5 and all(0.0 <= v <= 1.0 for v in mn["auroc"].values())
    # the same images as --data, with the same noise: nothing to separate
    assert all(v == pytest.approx(0.5) for v in out["ood"]["digits:28"]["auroc"].values())
    assert set(out["active_units"]) == set(out["kl_per_layer"])
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(eval_main, ["--ckpt", str(tiny_trained / "m.pt"), "--data", "digits", "--hist", "x.png"])
    assert bad.exit_code != 0 and "--hist and --detector need at least one --ood" in bad.output


def test_study_scores_every_snapshot_of_a_run(tiny_trained):
    from studies.ood_study import CANDIDATES, markdown, score_run

    rows = score_run(tiny_trained, n=20, last_only=False)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r["auroc"]) == {"mnist", "digits"}
        assert set(r["auroc"]["mnist"]) == {"L1", "KL", "L>1", "L>2", "LLR>1", "LLR>2"}  # k = 1..L-1
        assert r["val_elbo"] < 0 and r["test_elbo"] < 0
    table = markdown(rows).splitlines()
    assert len(table) == 4 and table[2].startswith(f"| {tiny_trained.name} | 1 | {rows[0]['step']} |")
    # every candidate derives from the shipped recipe and builds
    for name, (cfg, tc) in CANDIDATES.items():
        assert tc.data == "fashion-mnist:train" and tc.compile, name
        assert Biva(cfg).noise_dim > 0


def test_training_speed_levers_compute_the_same_step():
    from studies.train_speed import measure

    cfg = preset("tiny")
    ips, loss, grad = measure(cfg, 8, warmup=1, steps=2)
    ips_cl, loss_cl, grad_cl = measure(cfg, 8, channels_last=True, warmup=1, steps=2)
    assert ips > 0 and ips_cl > 0
    assert abs(float(loss - loss_cl)) <= 1e-4 * abs(float(loss))
    assert float((grad - grad_cl).abs().max()) <= 1e-4 * float(grad.abs().max())
    other, _, _ = measure(cfg, 8, warmup=1, steps=2, seed=1)
    assert other > 0 and abs(float(measure(cfg, 8, warmup=0, steps=1, seed=1)[1] - loss)) > 1e-3  # seed matters


def test_study_progress_appends_a_row_for_the_run_state(tiny_trained, tmp_path):
    from studies.ood_study import cli

    out = tmp_path / "progress.jsonl"
    for _ in range(2):
        res = CliRunner().invoke(cli, ["progress", "--run-dir", str(tiny_trained), "--out", str(out), "--n", "20"])
        assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0] == rows[1]  # same state, same noise: the same numbers
    assert rows[0]["epoch"] == 2 and set(rows[0]["auroc"]) == {"mnist", "digits"}


def test_log_fit_recovers_a_known_growth_and_where_it_reaches_the_target():
    from studies.ood_study import log_fit

    steps = [1000, 2000, 4000, 8000]
    fit = log_fit(steps, [0.80 + 0.02 * np.log2(s / 1000) for s in steps], target=0.90)
    assert fit["per_doubling"] == pytest.approx(0.02, abs=1e-9)
    assert fit["steps_to_target"] == pytest.approx(1000 * 2 ** 5, rel=1e-6)  # 0.10 / 0.02 = 5 doublings
    assert log_fit(steps, [0.8, 0.79, 0.78, 0.77], 0.9)["steps_to_target"] == float("inf")  # not growing


def test_study_curves_fit_the_progress_rows_and_plot(tiny_trained, tmp_path):
    from studies.ood_study import cli

    out = tmp_path / "progress.jsonl"
    base = {"run": "r", "epoch": 1, "minutes": 1.0, "val_elbo": -100.0, "test_elbo": -100.0}
    rows = [{**base, "step": s, "auroc": {"mnist": {"L1": 0.2, "LLR>1": a}, "digits": {"LLR>1": a, "L>1": 0.3}}}
            for s, a in ((100, 0.70), (400, 0.74))]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(cli, ["curves", "--progress", str(out), "--log", str(tiny_trained / "log.jsonl"),
                                   "--png", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    fits = json.loads(res.output.strip().splitlines()[-1])
    assert fits["mnist"]["per_doubling"] == pytest.approx(0.02) and fits["digits"]["per_doubling"] == pytest.approx(0.02)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
