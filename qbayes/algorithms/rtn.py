"""Round-to-nearest: each group's range from :mod:`qbayes.ranges`, every weight rounded
independently to the nearest code of the spec's format. Ignores the layer statistic ``H`` (the baseline every solver must beat)."""
from __future__ import annotations

import torch

from ..formats import PER_TENSOR, QuantizedWeight, group_view
from ..ranges import choose_params
from ..spec import QuantSpec
from .base import check_weight


def rtn(W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec) -> QuantizedWeight:
    """Quantize ``W`` (out, in) group by group with round-to-nearest; ``H`` is unused."""
    check_weight(W, spec)
    rows, cols = W.shape
    wg = group_view(W.float() if W.dtype not in (torch.float32, torch.float64) else W, spec.group_size)
    scale, zero = choose_params(wg, spec)
    codes = spec.fmt.encode(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.bits).to(torch.uint8).reshape(rows, cols)
    if spec.group_size == PER_TENSOR:
        scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
    return QuantizedWeight(codes, scale, zero, spec.bits, spec.group_size, spec.symmetric, spec.format)
