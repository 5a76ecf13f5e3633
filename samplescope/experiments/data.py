"""Named datasets that work offline, as float tensors with integer labels.

Nothing here downloads: each loader reads what is on disk (or ships in a package) and
says, in one line, how to get it when it is missing.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from samplescope.errors import SamplescopeError

# The names live with the config, torch-free, for the CLI; the loaders below cover them.
from samplescope.experiments.config import DATASETS

__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(SamplescopeError):
    """A dataset is missing or unreadable."""


# The train/test split of scikit-learn's digits, the same whatever the run's seed.
DIGITS_SPLIT_SEED = 0
_DIGITS = [str(i) for i in range(10)]
# Label order of each dataset's own distribution.
CLASS_NAMES: dict[str, list[str]] = {
    "digits": _DIGITS,
    "mnist": _DIGITS,
    "mnist1d": _DIGITS,
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


@dataclass(frozen=True)
class Dataset:
    """Train and test splits; ``x`` float32 with shape [N, *input_shape], ``y`` int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classes by label, when the dataset has them (stored in a trace's
        ``config["class_names"]`` so reports and `samplescope samples` can show them)."""
        return CLASS_NAMES.get(self.name)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0) -> Dataset:
    """Load a named dataset from disk (never from the network).

    Args:
        name: one of ``DATASETS``.
        data_dir: where the files are; each dataset has a default.
        seed: for datasets generated here (mnist1d); the digits split is fixed for every seed.

    Raises:
        DataError: unknown name, or the files are missing or unreadable.
    """
    loaders = {
        "digits": _digits,
        "fashion-mnist": _fashion_mnist,
        "mnist": _mnist,
        "cifar10": _cifar10,
        "mnist1d": _mnist1d,
    }
    if name not in loaders:
        msg = f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}"
        raise DataError(msg)
    return loaders[name](None if data_dir is None else Path(data_dir), seed)


def _digits(data_dir: Path | None, seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    # One fixed split for every seed: runs of different seeds then train on the same
    # samples under the same ids, so `samplescope compare` can line them up. The seed
    # still sets initialisation and batch order.
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, bunch.target, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=bunch.target
    )
    return _as_dataset("digits", x_tr, y_tr, x_te, y_te, 10)


def _fashion_mnist(data_dir: Path | None, seed: int) -> Dataset:
    candidates = [data_dir] if data_dir else [FASHION_MNIST_DIR]
    hint = (
        "install the Debian package dataset-fashion-mnist (apt-get install "
        "dataset-fashion-mnist) or pass --data-dir with the four IDX files"
    )
    folder = _find_idx_folder(candidates, "fashion-mnist", ["FashionMNIST/raw"], hint)
    return _idx_dataset("fashion-mnist", folder)


def _mnist(data_dir: Path | None, seed: int) -> Dataset:
    hint = "pass --data-dir with a torchvision MNIST folder (MNIST/raw/*-idx?-ubyte)"
    if data_dir is None:
        msg = f"mnist needs its files on disk: {hint}"
        raise DataError(msg)
    return _idx_dataset("mnist", _find_idx_folder([data_dir], "mnist", ["MNIST/raw"], hint))


def _cifar10(data_dir: Path | None, seed: int) -> Dataset:
    hint = "pass --data-dir with torchvision's cifar-10-batches-py folder (or its parent)"
    if data_dir is None:
        msg = f"cifar10 needs its files on disk: {hint}"
        raise DataError(msg)
    folder = next(
        (d for d in (data_dir, data_dir / "cifar-10-batches-py") if (d / "test_batch").exists()),
        None,
    )
    if folder is None:
        msg = f"no CIFAR-10 batches under {data_dir}: {hint}"
        raise DataError(msg)

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the user's own files, as torchvision reads them
        x = d[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        return x, np.asarray(d[b"labels"])

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = batch("test_batch")
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    mean = x_tr.mean((0, 2, 3), keepdims=True)
    std = x_tr.std((0, 2, 3), keepdims=True)
    return _as_dataset("cifar10", (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, 10)


def _mnist1d(data_dir: Path | None, seed: int) -> Dataset:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        msg = "mnist1d is generated by the mnist1d package: pip install mnist1d"
        raise DataError(msg) from error
    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)  # procedural: no download
    x_tr = np.asarray(data["x"], dtype=np.float32)[:, None, :]
    x_te = np.asarray(data["x_test"], dtype=np.float32)[:, None, :]
    return _as_dataset("mnist1d", x_tr, data["y"], x_te, data["y_test"], 10)


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find_idx_folder(candidates: list[Path], name: str, subdirs: list[str], hint: str) -> Path:
    for base in candidates:
        for folder in (base, *(base / s for s in subdirs)):
            if all(_idx_path(folder, f) is not None for f in _IDX_FILES.values()):
                return folder
    where = ", ".join(str(c) for c in candidates)
    msg = f"{name} IDX files not found in {where}: {hint}"
    raise DataError(msg)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.exists():
            return path
    return None


def _idx_dataset(name: str, folder: Path) -> Dataset:
    arrays = {key: _read_idx(_idx_path(folder, stem)) for key, stem in _IDX_FILES.items()}
    x_tr = arrays["x_train"].astype(np.float32)[:, None] / 255.0
    x_te = arrays["x_test"].astype(np.float32)[:, None] / 255.0
    return _as_dataset(name, x_tr, arrays["y_train"], x_te, arrays["y_test"], 10)


def _read_idx(path: Path | None) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dimensions, then unsigned bytes."""
    assert path is not None
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as error:
        msg = f"cannot read {path}: {error}"
        raise DataError(msg) from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        msg = f"{path} is not an IDX file of unsigned bytes"
        raise DataError(msg)
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        msg = f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}"
        raise DataError(msg)
    return body.reshape(shape)


def _as_dataset(
    name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, k: int
) -> Dataset:
    return Dataset(
        name,
        torch.as_tensor(np.ascontiguousarray(x_tr), dtype=torch.float32),
        torch.as_tensor(np.array(y_tr), dtype=torch.int64),
        torch.as_tensor(np.ascontiguousarray(x_te), dtype=torch.float32),
        torch.as_tensor(np.array(y_te), dtype=torch.int64),
        k,
    )
