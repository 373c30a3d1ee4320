"""Top-1 accuracy of a classifier."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``x`` whose arg-max logit is the label ``y`` (in batches of ``batch_size``)."""
    return float(torch.cat([model(b).argmax(1) for b in x.split(batch_size)]).eq(y).float().mean())
