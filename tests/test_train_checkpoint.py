"""Training, DDP, the checkpoint format and biva-eval."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from biva_core.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from biva_core.config import preset
from biva_core.noise import NoiseStream
from biva_core.objectives import evaluate_bounds
from biva_core.train import TrainConfig, train
from serving_helpers import free_port

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits_npy(tmp_path_factory) -> Path:
    """A small real data set: scikit-learn's digits at 28x28, as uint8 .npy."""
    from biva_core.data import load_raw
    x = (load_raw("digits", limit=600)[:, 0] * 255).round().astype(np.uint8)  # (N, 28, 28)
    p = tmp_path_factory.mktemp("data") / "digits.npy"
    np.save(p, x)
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_npy) -> tuple[Path, dict]:
    """The tiny preset trained for a few epochs on 600 digits; returns (checkpoint, first/last metrics)."""
    d = tmp_path_factory.mktemp("run")
    cfg = preset("tiny")
    tc = TrainConfig(data=f"npy:{digits_npy}", epochs=1, batch_size=32, val_fraction=0.1, ema=0.9)
    first = train(cfg, tc, d / "m.pt", d)
    tc = TrainConfig(data=f"npy:{digits_npy}", epochs=6, batch_size=32, val_fraction=0.1, ema=0.9)
    last = train(cfg, tc, d / "m.pt", d, resume=True)
    return d / "m.pt", {"first": first, "last": last, "dir": d}


def test_training_lowers_the_loss_and_resumes(trained):
    ckpt, m = trained
    assert m["last"]["epoch"] == 6  # resumed from epoch 1, not restarted
    assert m["last"]["val_elbo"] > m["first"]["val_elbo"] + 20, m
    log = [json.loads(line) for line in (m["dir"] / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]


def test_iw_bound_does_not_decrease_with_k_on_trained_model(trained):
    model, meta = load_model(trained[0])
    from biva_core.data import load_for_model
    x = torch.from_numpy(load_for_model("digits", meta, limit=16))
    l1 = [evaluate_bounds(model, x, NoiseStream(s), 1).iw.mean().item() for s in range(8)]
    l64 = [evaluate_bounds(model, x, NoiseStream(100 + s), 64).iw.mean().item() for s in range(8)]
    assert np.mean(l64) >= np.mean(l1), (np.mean(l1), np.mean(l64))


def test_checkpoint_round_trip_identical_outputs(trained, tmp_path):
    model, meta = load_model(trained[0])
    assert meta["binarize"] == "threshold" and meta["image_shape"] == [1, 28, 28]
    obj = read_checkpoint(trained[0])
    save_checkpoint(tmp_path / "copy.pt", model.cfg, model.state_dict(), obj["data"], obj["metrics"])
    again, _ = load_model(tmp_path / "copy.pt")
    x, eps = (torch.rand(4, 1, 28, 28) > 0.5).float(), torch.randn(4, model.noise_dim)
    with torch.no_grad():
        assert torch.equal(model(x, eps).log_w, again(x, eps).log_w)
        assert torch.equal(model.sample(eps).x_mean, again.sample(eps).x_mean)


def test_bad_checkpoints_give_one_line_errors(trained, tmp_path):
    good = trained[0].read_bytes()
    cases = {
        "truncated.pt": good[: len(good) // 2],
        "text.pt": b"hello, not a checkpoint\n",
        "empty.pt": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save({"format": "biva-checkpoint", "version": 99}, tmp_path / "future.pt")
    for name in [*cases, "foreign.pt", "future.pt", "missing.pt"]:
        with pytest.raises(CheckpointError) as e:
            load_model(tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and name in msg, msg


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BIVA_TEST_MARKER']}",))


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("BIVA_TEST_MARKER", str(marker))
    torch.save({"format": "biva-checkpoint", "version": 1, "config": {}, "state_dict": {}, "data": _Boom()},
               tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a loadable"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def test_biva_eval_json(trained):
    out = subprocess.run([sys.executable, "-m", "biva_core.evaluate", "--ckpt", str(trained[0]), "--data", "digits",
                          "--limit", "20", "--iw", "8", "--k", "0,1,3", "--json"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = json.loads(out.stdout)
    for key in ("elbo_nats", "iw_nats", "bits_per_dim", "kl_per_layer", "l_gt_k", "n_images"):
        assert key in res
    assert res["n_images"] == 20 and set(res["l_gt_k"]) == {"0", "1", "3"}
    assert abs(res["l_gt_k"]["0"] - res["elbo_nats"]) < 1e-4
    assert abs(res["bits_per_dim"] - (-res["elbo_nats"] / (784 * np.log(2)))) < 1e-6
    assert len(res["kl_per_layer"]) == 5


def test_biva_eval_pieces_give_the_numbers_of_one_run(trained):
    """--start/--limit pieces draw the noise one run would: their pooled means equal the whole run's."""
    from click.testing import CliRunner

    from biva_core.evaluate import main as eval_main

    def run(*args):
        res = CliRunner().invoke(eval_main, ["--ckpt", str(trained[0]), "--data", "digits", "--iw", "4",
                                             "--batch-size", "4", "--threads", "1", "--json", *args])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    whole = run("--limit", "12")
    pieces = [run("--start", "0", "--limit", "8"), run("--start", "8", "--limit", "4")]
    assert [p["n_images"] for p in pieces] == [8, 4]
    for key in ("elbo_nats", "iw_nats"):
        pooled = (8 * pieces[0][key] + 4 * pieces[1][key]) / 12
        assert abs(pooled - whole[key]) < 1e-3, key
    # a different seed gives different noise, so this comparison could fail
    assert abs(run("--limit", "12", "--seed", "5")["iw_nats"] - whole["iw_nats"]) > 1e-4
    bad = CliRunner().invoke(eval_main, ["--ckpt", str(trained[0]), "--data", "digits", "--start", "6",
                                         "--batch-size", "4"])
    assert bad.exit_code != 0 and "--start must be a multiple of --batch-size (4)" in bad.output


def test_biva_eval_bad_input_is_one_line(trained):
    out = subprocess.run([sys.executable, "-m", "biva_core.evaluate", "--ckpt", str(trained[0]), "--data",
                          "digits:32"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "expected images of shape (N, 1, 28, 28), got (N, 1, 32, 32)" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_ddp_two_processes_keep_replicas_identical(digits_npy, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "biva_core.train", "--preset", "tiny", "--data", f"npy:{digits_npy}", "--limit", "256",
           "--epochs", "2", "--batch-size", "16", "--threads", "1", "--out", str(tmp_path / "ddp.pt")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # a rank's own error (e.g. an abort at exit) comes before torchrun's long failure report: show it first
    rank_errors = [ln for ln in out.stderr.splitlines() if "terminate" in ln or "Error" in ln or "Fatal" in ln]
    assert out.returncode == 0, "\n".join(rank_errors[:20]) + "\n...\n" + out.stderr[-1500:]
    rep = json.loads((tmp_path / "ddp" / "replicas.json").read_text())
    assert rep["world_size"] == 2 and rep["replica_max_diff"] == 0.0
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    # 256 images, 10% held out -> 230 train; 2 ranks x 16 per step -> 7 steps per epoch
    assert log[-1]["step"] == 14
    load_model(tmp_path / "ddp.pt")
