r"""NF4, the 4-bit NormalFloat of QLoRA (Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023).

Each block of weights (64 by default) is scaled by its absolute maximum ``s`` and every weight
is replaced by the nearest of 16 levels ``q_k`` in ``[-1, 1]``:

.. math:: c = \arg\min_k |w / s - q_k|, \qquad \hat w = s\, q_c .

The levels are quantiles of the standard normal, so that, for normally distributed weights,
each level is used about equally often, with an exact zero: 8 positive levels at
:math:`\Phi^{-1}(p)` for ``p`` evenly spaced from ``δ = 0.9677083`` down to 1/2 (that end
excluded), 7 negative ones likewise (from ``δ`` in 7 steps), and 0, all divided by
:math:`\Phi^{-1}(δ)` so that the extremes are ``±1``. Codes are the level indices in
increasing order; there is no zero-point. ``clip="mse"`` searches shrunk absmax scales like the
integer formats' range search.
"""
from __future__ import annotations

import functools

import torch

from .base import Format, round_scale_up

OFFSET = 0.9677083


@functools.lru_cache(maxsize=None)
def _levels64() -> torch.Tensor:
    def ppf(p):
        return torch.special.ndtri(p)

    pos = ppf(torch.linspace(OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (v / v.max()).to(torch.float32).to(torch.float64)  # stored as float32 values


def levels(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels, increasing, ``levels[0] = -1``, ``levels[7] = 0``, ``levels[15] = 1``."""
    return _levels64().to(dtype=dtype, device=device)


class NF4(Format):
    """The NormalFloat-4 codebook with an absmax scale per block (this module)."""

    name = "nf4"
    summary = "QLoRA's 4-bit NormalFloat: absmax scale per group, no zero-point; --bits 4"
    affine = False

    def check(self, bits: int, group_size: int, symmetric: bool) -> str | None:
        if bits != 4:
            return f"the nf4 format has 4-bit codes, not {bits}: pass bits=4"
        return None

    def params_from_range(self, xmin, xmax, bits, symmetric, scale_dtype):
        amax = torch.maximum(-xmin, xmax).clamp_min(0)
        scale = torch.where(amax > 0, amax, torch.ones_like(amax))
        scale = round_scale_up(scale, scale_dtype)
        return scale, torch.zeros_like(scale)

    def encode(self, w, scale, zero, bits):
        lv = levels(w.dtype, w.device)
        mid = (lv[1:] + lv[:-1]) / 2
        return torch.bucketize(w / scale, mid).to(w.dtype)

    def decode(self, codes, scale, zero):
        return levels(scale.dtype, scale.device)[codes.long()] * scale

    def stores_zero(self, symmetric: bool) -> bool:
        return False

    def default_zero(self, bits: int) -> float:
        return 0.0
