"""Reference matmul on packed weights: unpack, decode with the weight's format, then a dense matmul.

This path is the ground truth every fast kernel is tested against, and the fallback that
always works (any device, any bit-width, any group size).
"""
from __future__ import annotations

import torch

from ..formats import get_format


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    in_features: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    format: str = "int",
) -> torch.Tensor:
    """Dense ``(out, in)`` weight from packed codes, group scales and packed zero-points, by the
    named format's own decoder (:meth:`qbayes.formats.Format.dequantize_packed`).

    ``group_size`` is the number of columns per group (``in_features`` for per-channel).
    Symmetric integer formats pass ``qzeros=None`` (zero-point ``2^(bits-1)``).
    """
    return get_format(format).dequantize_packed(qweight, scales, qzeros, bits, in_features, group_size, dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x Wᵀ + b`` in ``x``'s dtype."""
    b = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight.to(x.dtype), b)
