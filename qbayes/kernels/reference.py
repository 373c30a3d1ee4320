"""Reference matmul on packed weights: unpack, dequantize, then a dense matmul.

This path is the ground truth every fast kernel is tested against, and the fallback that
always works (any device, any bit-width, any group size).
"""
from __future__ import annotations

import torch

from ..formats import dequantize, unpack


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    in_features: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense ``(out, in)`` weight from packed codes, group scales and packed zero-points.

    ``group_size`` is the number of columns per group (``in_features`` for per-channel).
    Symmetric formats pass ``qzeros=None`` (zero-point ``2^(bits-1)``).
    """
    out = qweight.shape[0]
    n_groups = scales.shape[1]
    codes = unpack(qweight, bits, in_features).reshape(out, n_groups, group_size)
    s = scales.to(dtype).unsqueeze(-1)
    if qzeros is None:
        z = torch.full((), float(1 << (bits - 1)), dtype=dtype, device=s.device)
    else:
        z = unpack(qzeros, bits, n_groups).to(dtype).unsqueeze(-1)
    return dequantize(codes, s, z).reshape(out, in_features)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x Wᵀ + b`` in ``x``'s dtype."""
    b = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight.to(x.dtype), b)
