"""Calibration and evaluation images of the shipped classifiers (``qbayes.models.vision``).

CIFAR-10 ships only its test set: the first 1,000 test images calibrate and the other 9,000
evaluate. The Fashion-MNIST models calibrate on 1,000 training images (a seeded random subset)
and are evaluated on the 10,000 test images. Calibration never sees an evaluated image.
"""
from __future__ import annotations

import torch

from .cifar import load_cifar10_test
from .idx import load_image_dataset

CALIB_IMAGES = 1000


def classifier_splits(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(calibration images, evaluation images, evaluation labels)`` for a shipped classifier."""
    if name == "cifar10-cnn":
        (xc, _), (xe, ye) = load_cifar10_test("calib"), load_cifar10_test("eval")
        return xc, xe, ye
    x, _ = load_image_dataset("fashion-mnist", "train", normalize=None)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:CALIB_IMAGES]
    xe, ye = load_image_dataset("fashion-mnist", "test", normalize=None)
    return x[idx], xe, ye
