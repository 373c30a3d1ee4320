"""Small image classifiers used by the uncertainty benchmarks and the ``qbayes uq`` command."""
from __future__ import annotations

from torch import nn

from ..errors import QBayesError


def fashion_cnn(n_classes: int = 10, width: int = 32, hidden: int = 128) -> nn.Sequential:
    """Two conv blocks and two dense layers for 1x28x28 images (~225k parameters at the defaults).

    The last module is the ``nn.Linear`` output layer (what last-layer methods treat as random).
    """
    return nn.Sequential(
        nn.Conv2d(1, width, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 5 * 5, hidden), nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def split_last_layer(model: nn.Sequential) -> tuple[nn.Sequential, nn.Linear]:
    """``(features, head)`` of a Sequential ending in an ``nn.Linear``."""
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise QBayesError("expected an nn.Sequential whose last module is nn.Linear")
    return model[:-1], model[-1]
