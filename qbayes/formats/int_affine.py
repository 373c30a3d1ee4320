r"""Integer affine number formats as pure functions, and the ``"int"`` :class:`~.base.Format`.

A weight ``w`` is stored as an unsigned code ``c`` in ``[0, 2^b - 1]`` with a scale ``s`` and a
zero-point ``z`` shared by a group of weights:

.. math::  c = \mathrm{clamp}(\lfloor w / s \rceil + z,\ 0,\ 2^b - 1), \qquad \hat w = s\,(c - z).

* asymmetric: ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)`` (the range always
  contains 0, so ``z`` is a valid code);
* symmetric: ``z = 2^{b-1}`` (fixed, never stored), ``s = max|w| / (2^{b-1} - 1)``.

For every ``w`` inside the range the reconstruction error is at most ``s/2``. Scales are
rounded *up* to the storage dtype (float16 by default) before use, so what a solver sees is
exactly what is stored.
"""
from __future__ import annotations

import torch

from .base import Format, round_scale_up
from ..errors import QBayesError

SUPPORTED_BITS = tuple(range(1, 9))


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def sym_zero(bits: int) -> int:
    return 1 << (bits - 1)


def params_from_range(
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype | None = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point for ranges ``[xmin, xmax]`` (elementwise over groups).

    The range is first widened to contain 0. Returns ``(scale, zero)`` in the dtype of
    ``xmin``; ``zero`` holds integer values.
    """
    if bits not in SUPPORTED_BITS or (symmetric and bits < 2):
        raise QBayesError(f"unsupported bit-width {bits}: integer formats take 1..8 bits (symmetric 2..8)")
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if symmetric:
        amax = torch.maximum(-xmin, xmax)
        scale = amax / (sym_zero(bits) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = round_scale_up(scale, scale_dtype)
        zero = torch.full_like(scale, float(sym_zero(bits)))
    else:
        scale = (xmax - xmin) / max_code(bits)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = round_scale_up(scale, scale_dtype)
        zero = torch.round(-xmin / scale).clamp(0, max_code(bits))
    return scale, zero


def quantize_float(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w/s) + z, 0, 2^b-1)`` kept in ``w``'s float dtype (exact integers)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w/s) + z, 0, 2^b-1)`` as uint8; ``scale``/``zero`` broadcast against ``w``."""
    return quantize_float(w, scale, zero, bits).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``s * (c - z)`` in the dtype of ``scale``."""
    return (codes.to(scale.dtype) - zero) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize (simulation only; stores nothing). Same values as
    ``dequantize(quantize(w, s, z, b), s, z)``."""
    return (quantize_float(w, scale, zero, bits) - zero) * scale


class IntAffine(Format):
    """Integer affine codes ``ŵ = s (c − z)``, 1-8 bits, symmetric or asymmetric (this module)."""

    name = "int"
    summary = "integer affine codes s(c - z), symmetric or asymmetric (the default)"
    affine = True

    def check(self, bits: int, group_size: int, symmetric: bool) -> str | None:
        if not 2 <= bits <= 8:
            return f"unsupported bit-width {bits!r} for the int format: choose an integer from 2 to 8"
        return None

    def params_from_range(self, xmin, xmax, bits, symmetric, scale_dtype):
        return params_from_range(xmin, xmax, bits, symmetric, scale_dtype)

    def encode(self, w, scale, zero, bits):
        return quantize_float(w, scale, zero, bits)

    def decode(self, codes, scale, zero):
        return dequantize(codes, scale, zero)

    def fake_quantize(self, w, scale, zero, bits):
        return fake_quantize(w, scale, zero, bits)

    def stores_zero(self, symmetric: bool) -> bool:
        return not symmetric

    def default_zero(self, bits: int) -> float:
        return float(sym_zero(bits))
