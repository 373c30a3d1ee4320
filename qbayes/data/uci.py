"""The standard UCI regression benchmark with its canonical train/test splits.

The nine data sets and the 20 random 90/10 splits (5 for protein) of Hernández-Lobato &
Adams, "Probabilistic Backpropagation" (ICML 2015), as used by Gal & Ghahramani, "Dropout as
a Bayesian Approximation" (ICML 2016). Each set lives in ``<data_dir>/uci/<folder>/data/``:

- ``data.txt``: one whitespace-separated row per example (blank lines ignored);
- ``index_features.txt``, ``index_target.txt``: 0-based column numbers, one per line;
- ``index_train_K.txt``, ``index_test_K.txt``: 0-based row numbers of split ``K``.

Normalisation follows Gal & Ghahramani: features and target are standardised with the
mean and (population) standard deviation of the training rows only, a zero std is
replaced by 1, and the test target is left in original units so that test RMSE and
log-likelihood are reported in those units (un-normalise predictions with
:meth:`UCISplit.denormalize_y`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import QBayesError
from .text import data_dir

# friendly name -> folder under <data_dir>/uci/
UCI_SETS: dict[str, str] = {
    "boston": "bostonHousing",
    "concrete": "concrete",
    "energy": "energy",
    "kin8nm": "kin8nm",
    "naval": "naval-propulsion-plant",
    "power": "power-plant",
    "protein": "protein-tertiary-structure",
    "wine": "wine-quality-red",
    "yacht": "yacht",
}


@dataclass(frozen=True)
class UCISplit:
    """One train/test split, raw and normalised (float64, CPU).

    ``x_*`` are ``(n, d)``, ``y_*`` are ``(n,)``. ``x_train_n = (x_train - x_mean) / x_std``,
    ``x_test_n`` likewise with the training statistics, ``y_train_n = (y_train - y_mean) / y_std``.
    """

    name: str
    split: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor
    x_train_n: torch.Tensor
    y_train_n: torch.Tensor
    x_test_n: torch.Tensor

    def denormalize_y(self, y_n: torch.Tensor) -> torch.Tensor:
        """Predictions on the normalised scale back to original units: ``y_n * y_std + y_mean``."""
        return y_n * self.y_std + self.y_mean


def _folder(name: str, root: str | Path | None) -> Path:
    """``<root>/uci/<folder>/data`` for a friendly (or folder) name; raises on an unknown name."""
    folder = UCI_SETS.get(name, name if name in UCI_SETS.values() else None)
    if folder is None:
        raise QBayesError(f"unknown UCI data set {name!r}: choose one of {sorted(UCI_SETS)}")
    path = (Path(root) if root is not None else data_dir()) / "uci" / folder / "data"
    if not path.is_dir():
        raise QBayesError(f"UCI folder {path} not found: set QBAYES_DATA to the folder holding uci/{folder}/data")
    return path


def _read_table(path: Path) -> np.ndarray:
    """A whitespace-separated numeric file as a 2-D float64 array."""
    if not path.is_file():
        raise QBayesError(f"UCI file {path} not found")
    try:
        arr = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise QBayesError(f"UCI file {path} is not a whitespace-separated table of numbers ({e})") from e
    if arr.size == 0:
        raise QBayesError(f"UCI file {path} is empty")
    return arr


def _read_index(path: Path, bound: int, what: str) -> np.ndarray:
    """0-based integer indices (written as ints or floats) from ``path``, checked to lie in ``[0, bound)``."""
    vals = _read_table(path).reshape(-1)
    idx = vals.astype(np.int64)
    if not np.array_equal(idx, vals):
        raise QBayesError(f"UCI index file {path} holds non-integer {what} numbers")
    if idx.min() < 0 or idx.max() >= bound:
        raise QBayesError(f"UCI index file {path} refers to {what} {int(idx.min())}..{int(idx.max())}, "
                          f"outside 0..{bound - 1}")
    return idx


def n_splits(name: str, *, root: str | Path | None = None) -> int:
    """The number of train/test splits of a set: its ``index_train_*.txt`` files (20; 5 for protein)."""
    return len(list(_folder(name, root).glob("index_train_*.txt")))


def _standardise(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and population std (``ddof=0``, as Gal & Ghahramani) with a zero std set to 1."""
    mean = a.mean(dim=0)
    std = a.std(dim=0, correction=0)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def load_uci_split(name: str, split: int, *, root: str | Path | None = None) -> UCISplit:
    """Split ``split`` of UCI regression set ``name``, with Gal & Ghahramani normalisation.

    Args:
        name: a key of :data:`UCI_SETS` (``"boston"``, ``"yacht"``, ...) or its folder name.
        split: ``0 .. n_splits(name) - 1``.
        root: the data folder; defaults to :func:`qbayes.data.data_dir`.

    Statistics come from the training rows only; ``y_test`` stays in original units.
    """
    folder = _folder(name, root)
    count = n_splits(name, root=root)
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < count:
        raise QBayesError(f"split {split!r} is not available for UCI set {name!r}: choose 0..{count - 1}")
    data = _read_table(folder / "data.txt")
    n_rows, n_cols = data.shape
    features = _read_index(folder / "index_features.txt", n_cols, "column")
    target = _read_index(folder / "index_target.txt", n_cols, "column")
    if target.size != 1:
        raise QBayesError(f"{folder / 'index_target.txt'} names {target.size} target columns, expected one")
    if int(target[0]) in set(features.tolist()):
        raise QBayesError(f"UCI set {name!r}: target column {int(target[0])} is also listed as a feature")
    train = _read_index(folder / f"index_train_{split}.txt", n_rows, "row")
    test = _read_index(folder / f"index_test_{split}.txt", n_rows, "row")
    if np.intersect1d(train, test).size:
        raise QBayesError(f"UCI set {name!r} split {split}: train and test rows overlap")

    x = torch.from_numpy(data[:, features])
    y = torch.from_numpy(data[:, int(target[0])])
    x_train, x_test = x[torch.from_numpy(train)], x[torch.from_numpy(test)]
    y_train, y_test = y[torch.from_numpy(train)], y[torch.from_numpy(test)]
    x_mean, x_std = _standardise(x_train)
    y_mean, y_std = _standardise(y_train)
    return UCISplit(
        name=name, split=split,
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        x_mean=x_mean, x_std=x_std, y_mean=y_mean, y_std=y_std,
        x_train_n=(x_train - x_mean) / x_std,
        y_train_n=(y_train - y_mean) / y_std,
        x_test_n=(x_test - x_mean) / x_std,
    )
