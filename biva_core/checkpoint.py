"""The checkpoint format, `model.pt`.

A plain dict of strings, numbers, lists and tensors, so it loads with `torch.load(weights_only=True)`
and never unpickles arbitrary objects:

    format       "biva-checkpoint"
    version      FORMAT_VERSION
    config       BivaConfig.to_dict()
    state_dict   the EMA weights (weight-norm parametrisations kept, as in training)
    data         {"image_shape": [C, H, W], "binarize": "threshold"|"bernoulli"|"8bit",
                  "test_seed": int, "train_spec": str}
    metrics      free-form numbers from training (optional)
    train_state  only in resumable run files: raw weights, optimizer, EMA, step, epoch (optional)
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import BivaConfig
from .model import Biva

FORMAT = "biva-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a loadable BIVA checkpoint; the message is one line."""


def binarization(data: dict[str, Any]) -> str:
    """How the checkpoint's test set was preprocessed (its "data" entry; checkpoints before the key: threshold)."""
    return str(data.get("binarize", "threshold"))


def sha256_file(path: str | Path) -> str:
    """The checkpoint's identity: the hex SHA-256 of its bytes (the served metadata and fitted files carry it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: str | Path, cfg: BivaConfig, state_dict: dict[str, torch.Tensor], data: dict[str, Any],
                    metrics: dict[str, Any] | None = None, train_state: dict[str, Any] | None = None) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": FORMAT, "version": FORMAT_VERSION, "config": cfg.to_dict(),
           "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
           "data": dict(data), "metrics": dict(metrics or {})}
    if train_state is not None:
        obj["train_state"] = train_state
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_reason(e: Exception) -> str:
    """torch.load's failure in a few words. Its "weights only" refusal advises loading with weights_only=False,
    which would run whatever code the file holds: this project never does, so the advice is not passed on."""
    text = str(e).strip()
    if "weights only load failed" in text.lower():
        if "Unsupported global" in text or "GLOBAL" in text:
            return "it holds Python objects other than tensors and plain data, which are never unpickled here"
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return "not a PyTorch file of tensors and plain data" + (f" ({detail.group(1).strip()[:80]})" if detail else "")
    first = text.splitlines()[0] if text else type(e).__name__
    return f"{type(e).__name__}: {first.split('. ')[0][:200]}"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check the container; CheckpointError (one line) on a wrong, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt, truncated or unsafe pickles
        raise CheckpointError(f"{path}: not a loadable BIVA checkpoint ({_load_reason(e)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a BIVA checkpoint (expected a dict with format={FORMAT!r})")
    if obj.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {obj.get('version')!r}, "
                              f"this code reads version {FORMAT_VERSION}")
    for key in ("config", "state_dict", "data"):
        if not isinstance(obj.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint is missing its {key!r} entry")
    return obj


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Biva, dict[str, Any]]:
    """Rebuild the model (eval mode, EMA weights) and return it with the checkpoint's data metadata."""
    obj = read_checkpoint(path)
    try:
        cfg = BivaConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config in checkpoint ({e})") from None
    model = Biva(cfg)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the config ({first[:200]})") from None
    return model.to(device).eval(), obj["data"]
