r"""Logarithmic codes for non-negative activations (post-softmax attention probabilities).

A value ``x ∈ [0, s]`` is stored as the code

.. math:: c = \mathrm{clamp}\big(\lfloor -k \log_2 (x / s) \rceil,\ 0,\ 2^b - 1\big),
          \qquad \hat x = s \, 2^{-c/k}, \quad \hat x = 0 \text{ for } c = 2^b - 1,

with ``k = 1`` (log2, as in FQ-ViT) or ``k = 2`` (log√2, as in RepQ-ViT: levels a factor √2
apart, so twice as fine). The largest code is reserved for an exact zero, which a value
takes when it is below the smallest non-zero level ``s 2^{-(2^b-2)/k}`` by more than half a
step in the log domain (``x = 0`` included). Rounding is done in the log domain, so the
relative error of every value that is not flushed to zero is at most ``2^{1/(2k)} - 1``
(41% for log2, 19% for log√2) — and softmax outputs are mostly tiny, where a uniform grid
would flush them all to zero.
"""
from __future__ import annotations

import torch

from ..errors import QBayesError

#: log-domain steps per octave of each log format
LOG_FORMATS = {"log2": 1, "logsqrt2": 2}


def _k(fmt: str) -> int:
    try:
        return LOG_FORMATS[fmt]
    except KeyError:
        raise QBayesError(f"unknown log format {fmt!r}: choose one of {sorted(LOG_FORMATS)}") from None


def log_encode(x: torch.Tensor, scale: torch.Tensor, bits: int, fmt: str = "log2") -> torch.Tensor:
    """Codes of ``x`` (non-negative) as exact integers in ``x``'s float dtype."""
    if not 2 <= bits <= 8:
        raise QBayesError(f"unsupported bit-width {bits} for a log format: choose 2..8")
    k, top = _k(fmt), (1 << bits) - 1
    ratio = (x / scale).clamp(min=0.0)
    c = torch.round(-k * torch.log2(ratio))  # ratio 0 gives +inf
    c = torch.nan_to_num(c, nan=float(top), posinf=float(top)).clamp(0, top)
    return c


def log_decode(codes: torch.Tensor, scale: torch.Tensor, bits: int, fmt: str = "log2") -> torch.Tensor:
    """Values of ``codes``: ``s 2^{-c/k}``, and 0 for the reserved top code."""
    k, top = _k(fmt), (1 << bits) - 1
    vals = scale * torch.exp2(-codes / k)
    return torch.where(codes >= top, torch.zeros_like(vals), vals)


def log_fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, fmt: str = "log2") -> torch.Tensor:
    """Encode then decode (simulation; no gradient flows through the rounding)."""
    return log_decode(log_encode(x.detach(), scale, bits, fmt), scale, bits, fmt)
