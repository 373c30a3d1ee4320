"""CIFAR-10 test images from ``cifar10/test_jpeg.npz`` of the data folder (the 10,000 test images
after a JPEG re-encoding; no training split is shipped). The issue-14 protocol calibrates on
the first 1,000 and evaluates on the other 9,000: :data:`CALIB_SPLIT`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import QBayesError
from .text import data_dir

CALIB_SPLIT = 1000


def load_cifar10_test(part: str = "all", *, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: float32 ``(n, 3, 32, 32)`` raw 0-255 pixels and int64 labels.

    ``part``: ``"all"`` (10,000), ``"calib"`` (the first 1,000) or ``"eval"`` (the other 9,000).
    """
    parts = {"all": slice(None), "calib": slice(0, CALIB_SPLIT), "eval": slice(CALIB_SPLIT, None)}
    if part not in parts:
        raise QBayesError(f"unknown CIFAR-10 part {part!r}: choose one of {sorted(parts)}")
    path = (Path(root) if root is not None else data_dir()) / "cifar10" / "test_jpeg.npz"
    if not path.is_file():
        raise QBayesError(f"CIFAR-10 test images are not available: {path} is missing (see ../shared/data/README.md)")
    try:
        with np.load(path, allow_pickle=False) as d:
            images, labels = d["images"], d["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise QBayesError(f"{path} is not the CIFAR-10 npz (images, labels): {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(labels) != len(images):
        raise QBayesError(f"{path} holds images {images.dtype}{images.shape} and {len(labels)} labels, expected "
                          "uint8 (n, 32, 32, 3) with one label each")
    x = torch.from_numpy(images[parts[part]]).permute(0, 3, 1, 2).to(torch.float32).contiguous()
    return x, torch.from_numpy(labels[parts[part]].astype(np.int64))
