"""`biva-train`: the paper's optimisation (Appendix C), single process or torchrun/DDP (gloo or nccl).

    biva-train --preset default28 --data fashion-mnist:train --binarize threshold --out models/default28.pt

Adamax (lr 2e-3), free bits on the loss only, EMA of the parameters for evaluation and the checkpoint,
dropout from the config, exponential learning-rate decay per epoch, validation on a held-out part of the
training set. A run folder (`--run-dir`) holds the resumable state; `--resume` continues from it.
With torchrun every rank trains on its shard; rank 0 validates, logs and writes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from .checkpoint import read_checkpoint, save_checkpoint
from .config import PRESETS, BivaConfig, preset
from .data import DATA_SPEC_HELP, binarize, load_raw, train_val_split
from .model import Biva
from .noise import NoiseStream
from .objectives import evaluate_bounds, training_loss
from .stats import bits_per_dim


@dataclass(frozen=True)
class TrainConfig:
    data: str = "fashion-mnist:train"  # data spec of the training set
    binarize: str = "threshold"  # "threshold", "bernoulli" (dynamic) or "8bit"
    val_fraction: float = 0.05  # held out from the training set for validation (never the test set)
    batch_size: int = 48  # per process (the paper: 48)
    lr: float = 2e-3  # Adamax
    lr_decay: float = 1.0  # multiplied into the learning rate after every epoch
    free_bits: float = 2.0  # lambda, per latent group, on the loss only
    free_bits_until: float = 1.0  # fraction of the epochs after which lambda drops to 0 (the paper's finetuning)
    ema: float = 0.999  # EMA decay of the parameters used for evaluation (warmed up: min(ema, (1+n)/(10+n)))
    epochs: int = 10
    max_minutes: float = 0.0  # stop at the first step past this wall time (0: no limit)
    seed: int = 0
    limit: int = 0  # use only the first N training images (0: all)
    val_every: int = 1  # validate every N epochs
    kl_warmup: float = 0.0  # epochs over which the KL weight beta ramps linearly from 0 to 1 (0: beta = 1)
    compile: bool = False  # torch.compile the training step (about 1.3x more images/s on this CPU, same numbers)
    keep_epochs: bool = False  # also write RUN_DIR/epoch_N.pt (EMA weights) after every epoch, for studies


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _log(msg: str) -> None:
    if _dist_info()[0] == 0:
        tqdm.write(msg)


def prepare_batch(x: np.ndarray, mode: str, rng: np.random.Generator) -> torch.Tensor:
    """Dynamic Bernoulli binarisation draws a fresh sample each time; the other modes are fixed."""
    if mode == "bernoulli":
        x = (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))


@torch.no_grad()
def validate(model: Biva, x_val: np.ndarray, batch_size: int = 500, seed: int = 1234) -> dict[str, float]:
    """Mean L_1 (nats) and bits/dim on the validation images, with fixed noise."""
    model.eval()
    stream = NoiseStream(seed)
    total, kl = 0.0, 0.0
    for i in range(0, len(x_val), batch_size):
        xb = torch.from_numpy(x_val[i:i + batch_size])
        b = evaluate_bounds(model, xb, stream, 1)
        total += b.elbo.sum().item()
        kl += b.kl.sum().item()
    n = len(x_val)
    elbo = total / n
    return {"val_elbo": elbo, "val_kl": kl / n, "val_bpd": float(bits_per_dim(elbo, int(np.prod(x_val.shape[1:]))))}


def kl_weight(warmup_epochs: float, progress: float) -> float:
    """beta for the KL term after `progress` epochs: a linear ramp from 0 to 1 over `warmup_epochs`."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, progress / warmup_epochs)


def ema_avg_fn(decay: float):
    """EMA update with the usual warm-up, min(decay, (1 + n) / (10 + n)), so early weights fade fast."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return d * averaged + (1.0 - d) * current

    return avg


def _load_data(cfg: BivaConfig, tc: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training images, validation images): bernoulli keeps the training intensities (binarised per batch) and
    samples the validation set once with a fixed seed."""
    raw = load_raw(tc.data, tc.limit or None)
    if tuple(raw.shape[1:]) != cfg.image_shape:
        raise click.UsageError(f"data {tc.data} has images of shape {raw.shape[1:]}, "
                               f"the config expects {cfg.image_shape}")
    tr_idx, val_idx = train_val_split(len(raw), tc.val_fraction, tc.seed)
    x_val = binarize(raw[val_idx], tc.binarize, seed=tc.seed)
    x_train = raw[tr_idx] if tc.binarize == "bernoulli" else binarize(raw[tr_idx], tc.binarize)
    return x_train, x_val


class _Run:
    """One process's training state: model, optimiser, EMA, counters; resumable from RUN_DIR/last.pt."""

    def __init__(self, cfg: BivaConfig, tc: TrainConfig, run_dir: Path, resume: bool, reset_ema: bool):
        self.cfg, self.tc, self.run_dir = cfg, tc, run_dir
        self.rank, self.world = _dist_info()
        self.model = Biva(cfg)
        # under DDP, calls go through the wrapper (gradient all-reduce); attributes still come from the model
        ddp = self.world > 1
        self.forward_model = _DDPView(torch.nn.parallel.DistributedDataParallel(self.model)) if ddp else self.model
        self.opt = torch.optim.Adamax(self.model.parameters(), lr=tc.lr)
        self.ema = AveragedModel(self.model, avg_fn=ema_avg_fn(tc.ema), use_buffers=True)
        self.start_epoch, self.step, self.minutes_before = 0, 0, 0.0
        if resume and (run_dir / "last.pt").exists():
            self._resume(reset_ema)
        self.rng = np.random.default_rng([tc.seed, self.rank, self.start_epoch])
        self.noise = NoiseStream(int(self.rng.integers(2**62)))
        self.loss_fn = torch.compile(training_loss) if tc.compile else training_loss
        self.t0 = time.time()

    def _resume(self, reset_ema: bool) -> None:
        st = read_checkpoint(self.run_dir / "last.pt")["train_state"]
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        if reset_ema:  # restart the average from the current weights (e.g. after a too-slow early EMA)
            self.ema = AveragedModel(self.model, avg_fn=ema_avg_fn(self.tc.ema), use_buffers=True)
        else:
            self.ema.load_state_dict(st["ema"])
        self.start_epoch, self.step = int(st["epoch"]), int(st["step"])
        self.minutes_before = float(st.get("minutes", 0.0))
        _log(f"resumed from {self.run_dir / 'last.pt'} at epoch {self.start_epoch}, step {self.step}")

    def minutes(self) -> float:
        return self.minutes_before + (time.time() - self.t0) / 60

    def epoch(self, epoch: int, x_train: np.ndarray, lam: float) -> tuple[bool, float]:
        """One epoch (or until the wall-time budget is spent); returns (stopped early, last KL weight)."""
        tc, world, model = self.tc, self.world, self.model
        for g in self.opt.param_groups:
            g["lr"] = tc.lr * tc.lr_decay ** epoch
        perm = np.random.default_rng([tc.seed, epoch]).permutation(len(x_train))
        n_steps = len(perm) // (tc.batch_size * world)
        perm = perm[: n_steps * tc.batch_size * world].reshape(n_steps, world, tc.batch_size)[:, self.rank]
        model.train()
        bar = tqdm(perm, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=self.rank != 0, mininterval=2.0)
        n_dims, beta = int(np.prod(self.cfg.image_shape)), 1.0
        for i, idx in enumerate(bar):
            xb = prepare_batch(x_train[np.sort(idx)], tc.binarize, self.rng)
            eps = self.noise.take((xb.shape[0], model.noise_dim))
            beta = kl_weight(tc.kl_warmup, epoch + i / n_steps)
            # tensors, not floats: a compiled step would otherwise recompile for every new beta
            loss, stats = self.loss_fn(self.forward_model, xb, eps, torch.tensor(lam), torch.tensor(beta))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.ema.update_parameters(model)
            self.step += 1
            bar.set_postfix(loss=f"{stats['loss']:.1f}", elbo=f"{stats['elbo']:.1f}", kl=f"{stats['kl']:.1f}",
                            bpd=f"{float(bits_per_dim(stats['elbo'].item(), n_dims)):.3f}", refresh=False)
            if tc.max_minutes and time.time() - self.t0 > tc.max_minutes * 60:
                return True, beta
        return False, beta

    def save(self, epoch: int, out: Path, metrics: dict) -> None:
        """The resumable state to RUN_DIR/last.pt, the EMA checkpoint to `out` (rank 0 only)."""
        cfg, tc, weights = self.cfg, self.tc, self.ema.module.state_dict()
        data_meta = {"image_shape": list(cfg.image_shape), "binarize": tc.binarize, "test_seed": 0,
                     "train_spec": tc.data}
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "ema": self.ema.state_dict(),
                 "epoch": epoch + 1, "step": self.step, "minutes": self.minutes()}
        save_checkpoint(self.run_dir / "last.pt", cfg, weights, data_meta, metrics, train_state=state)
        save_checkpoint(out, cfg, weights, data_meta, metrics)
        if tc.keep_epochs:
            save_checkpoint(self.run_dir / f"epoch_{epoch + 1}.pt", cfg, weights, data_meta, metrics)


def train(cfg: BivaConfig, tc: TrainConfig, out: Path, run_dir: Path, resume: bool = False,
          reset_ema: bool = False) -> dict[str, float]:
    """Train and write the EMA checkpoint to `out`; returns the last metrics."""
    torch.manual_seed(tc.seed)
    x_train, x_val = _load_data(cfg, tc)
    run = _Run(cfg, tc, run_dir, resume, reset_ema)
    metrics: dict[str, float] = {}
    for epoch in range(run.start_epoch, tc.epochs):
        lam = tc.free_bits if epoch < math.ceil(tc.free_bits_until * tc.epochs) else 0.0
        stop, beta = run.epoch(epoch, x_train, lam)
        last = stop or epoch + 1 == tc.epochs
        if run.rank == 0 and ((epoch + 1) % tc.val_every == 0 or last):
            metrics = {"epoch": epoch + 1, "step": run.step, "minutes": run.minutes(), "free_bits": lam,
                       "kl_weight": beta, **validate(run.ema.module, x_val)}
            _log(json.dumps(metrics))
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if run.rank == 0:
            run.save(epoch, out, metrics)
        if stop:
            _log(f"stopping after {tc.max_minutes} minutes (epoch {epoch + 1}, step {run.step})")
            break
    if run.world > 1:
        metrics["replica_max_diff"] = _replica_max_diff(run.model)
        if run.rank == 0:
            with open(run_dir / "replicas.json", "w") as f:
                json.dump({"replica_max_diff": metrics["replica_max_diff"], "world_size": run.world}, f)
    return metrics


class _DDPView:
    """Calls go through DDP's forward (gradient sync); attributes come from the wrapped model."""

    def __init__(self, ddp: torch.nn.Module):
        self._ddp = ddp

    def __call__(self, *args, **kwargs):
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._ddp.module, name)


def _replica_max_diff(model: Biva) -> float:
    """Max |difference| between this process's parameters and rank 0's (0.0 when replicas agree)."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", "preset_name", default="default28", show_default=True,
              type=click.Choice(sorted(PRESETS)), help="Architecture preset (Appendix C, or the small default).")
@click.option("--variant", type=click.Choice(["biva", "lvae+", "lvae"]), default=None,
              help="Table 1 ablation: override the preset's variant.")
@click.option("--data", default=TrainConfig.data, show_default=True, help="Training data spec.\n\n\b\n" + DATA_SPEC_HELP)
@click.option("--binarize", "binarize_mode", default="threshold", show_default=True,
              type=click.Choice(["threshold", "bernoulli", "8bit"]), help="Pixel preprocessing.")
@click.option("--epochs", default=TrainConfig.epochs, show_default=True, help="Number of epochs.")
@click.option("--batch-size", default=TrainConfig.batch_size, show_default=True, help="Images per step and process.")
@click.option("--lr", default=TrainConfig.lr, show_default=True, help="Adamax learning rate.")
@click.option("--lr-decay", default=TrainConfig.lr_decay, show_default=True, help="Learning-rate factor per epoch.")
@click.option("--free-bits", default=TrainConfig.free_bits, show_default=True, help="Free bits lambda (nats per latent).")
@click.option("--free-bits-until", default=TrainConfig.free_bits_until, show_default=True,
              help="Fraction of the epochs with free bits; lambda = 0 after (finetuning).")
@click.option("--kl-warmup", default=TrainConfig.kl_warmup, show_default=True,
              help="Epochs over which the KL weight ramps from 0 to 1 (0: no warm-up).")
@click.option("--compile", "compile_step", is_flag=True, help="torch.compile the training step (same numbers, faster).")
@click.option("--keep-epochs", is_flag=True, help="Also write RUN_DIR/epoch_N.pt after every epoch.")
@click.option("--ema", default=TrainConfig.ema, show_default=True, help="EMA decay of the evaluation weights.")
@click.option("--val-fraction", default=TrainConfig.val_fraction, show_default=True,
              help="Part of the training set held out for validation.")
@click.option("--max-minutes", default=0.0, show_default=True, help="Wall-time budget (0: none).")
@click.option("--limit", default=0, show_default=True, help="Use only the first N training images (0: all).")
@click.option("--seed", default=0, show_default=True, help="Seed for splits, shuffling and noise.")
@click.option("--threads", default=0, show_default=True, help="torch threads per process (0: torch's default).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("model.pt"), show_default=True,
              help="Where to write the EMA checkpoint.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the resumable state and the log (default: OUT's folder / OUT's stem).")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/last.pt.")
@click.option("--reset-ema", is_flag=True, help="With --resume: restart the EMA from the current weights.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(preset_name, variant, data, binarize_mode, epochs, batch_size, lr, lr_decay, free_bits, free_bits_until,
         kl_warmup, compile_step, keep_epochs, ema, val_fraction, max_minutes, limit, seed, threads, out, run_dir, resume, reset_ema, debug):
    """Train BIVA and write a checkpoint (run under torchrun for data parallelism)."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cfg = preset(preset_name, **({"variant": variant} if variant else {}))
    tc = TrainConfig(data=data, binarize=binarize_mode, val_fraction=val_fraction, batch_size=batch_size, lr=lr,
                     lr_decay=lr_decay, free_bits=free_bits, free_bits_until=free_bits_until, ema=ema, epochs=epochs,
                     max_minutes=max_minutes, seed=seed, limit=limit, kl_warmup=kl_warmup, compile=compile_step,
                     keep_epochs=keep_epochs)
    run_dir = run_dir or out.parent / out.stem
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        train(cfg, tc, out, run_dir, resume, reset_ema)
    except (ValueError, FileNotFoundError) as e:
        if debug:
            raise
        raise click.ClickException(str(e)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if world > 1:
        _exit_skipping_finalization()


def _exit_skipping_finalization() -> None:
    """End a DDP worker with status 0 without Python's interpreter shutdown.

    With torch 2.13, DistributedDataParallel keeps the gloo process group alive after destroy_process_group (its
    worker threads are still running; checked by listing the process's threads). When one of those threads drops
    the last reference to a Python-owned tensor while the interpreter is shutting down, it cannot take the GIL and
    the process aborts ("terminate called without an active exception"): 7 of 100 two-process runs of the DDP test
    failed that way here (core dump: c10d::ProcessGroupGloo::AsyncWork::~AsyncWork -> decref_pyobject -> take_gil
    during Py_FinalizeEx). Everything this process writes is closed by now, so skipping the shutdown loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
