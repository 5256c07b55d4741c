"""What the client writes: image grids (PNG) and per-image rows (CSV / JSON, incrementally); the figures are
biva_core.plots'."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import IO, Any

import numpy as np

GRID_PAD = 2  # pixels between tiles and around the grid


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of a square-ish grid for n tiles: cols = ceil(sqrt(n))."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = GRID_PAD) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] row by row into one uint8 image.

    Returns (rows (H + pad) + pad, cols (W + pad) + pad) for C = 1, with a trailing 3 for C = 3; the
    padding is white. Also takes (R, K, C, H, W): R rows of K tiles (reconstruction grids).
    """
    if images.ndim == 5:
        rows, cols = images.shape[:2]
        images = images.reshape(rows * cols, *images.shape[2:])  # (R*K, C, H, W)
    else:
        rows, c = grid_shape(len(images))
        cols = cols or c
        rows = math.ceil(len(images) / cols)
    n, C, H, W = images.shape
    grid = np.ones((C, rows * (H + pad) + pad, cols * (W + pad) + pad), np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, top:top + H, left:left + W] = images[i]
    grid = (np.clip(grid, 0.0, 1.0) * 255).round().astype(np.uint8)
    return grid[0] if C == 1 else grid.transpose(1, 2, 0)  # (H', W') or (H', W', 3)


def save_png(pixels: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


class RowWriter:
    """Writes dict rows to .csv, .json (one array) or .jsonl, flushing after every batch of rows.

    Rows written before an interruption stay on disk; closing (also on Ctrl-C) ends the JSON array so
    the file stays valid.
    """

    FORMATS = (".csv", ".json", ".jsonl")

    def __init__(self, path: str | Path, columns: list[str]):
        self.path = Path(path)
        self.format = self.path.suffix.lower()
        if self.format not in self.FORMATS:
            raise ValueError(f"--out: expected a file ending in {', '.join(self.FORMATS)}, got {str(self.path)!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = columns
        self.count = 0
        self._f: IO[str] | None = self.path.open("w", newline="")
        if self.format == ".csv":
            self._csv = csv.DictWriter(self._f, fieldnames=columns)
            self._csv.writeheader()
        elif self.format == ".json":
            self._f.write("[")
        self._f.flush()

    def write(self, rows: list[dict[str, Any]]) -> None:
        assert self._f is not None, "writer closed"
        for row in rows:
            if self.format == ".csv":
                self._csv.writerow(row)
            elif self.format == ".json":
                self._f.write(("," if self.count else "") + "\n  " + json.dumps(row))
            else:
                self._f.write(json.dumps(row) + "\n")
            self.count += 1
        self._f.flush()

    def close(self) -> None:
        if self._f is None:
            return
        if self.format == ".json":
            self._f.write("\n]\n")
        self._f.close()
        self._f = None

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
