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
