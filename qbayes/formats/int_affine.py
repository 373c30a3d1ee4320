r"""Integer affine number formats as pure functions.

A weight ``w`` is stored as an unsigned code ``c`` in ``[0, 2^b - 1]`` with a scale ``s`` and a
zero-point ``z`` shared by a group of weights:

.. math::  c = \mathrm{clamp}(\lfloor w / s \rceil + z,\ 0,\ 2^b - 1), \qquad \hat w = s\,(c - z).

* asymmetric: ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)`` (the range always
  contains 0, so ``z`` is a valid code);
* symmetric: ``z = 2^{b-1}`` (fixed, never stored), ``s = max|w| / (2^{b-1} - 1)``.

For every ``w`` inside the range the reconstruction error is at most ``s/2``.

Granularity is expressed by reshaping a ``(rows, cols)`` matrix into groups along the input
(column) dimension: ``group_size = g`` gives ``(rows, cols/g, g)``; per-channel is one group of
``cols``; per-tensor is one group of ``rows*cols``. Scales are rounded *up* to the storage
dtype (float16 by default) before use, so what a solver sees is exactly what is stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PER_CHANNEL = -1
PER_TENSOR = 0
SUPPORTED_BITS = tuple(range(1, 9))


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def sym_zero(bits: int) -> int:
    return 1 << (bits - 1)


def round_scale_up(scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Round positive scales to the nearest value representable in ``dtype`` that is not smaller.

    Rounding up keeps the whole [min, max] range inside the code grid. ``dtype=None`` keeps
    the input precision. The result keeps ``scale``'s dtype.
    """
    if dtype is None or dtype == scale.dtype:
        return scale
    finfo = torch.finfo(dtype)
    s = scale.clamp(min=finfo.tiny, max=finfo.max)
    r = s.to(dtype)
    low = r.to(scale.dtype) < s
    if bool(low.any()):
        r = torch.where(low, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    return r.to(scale.dtype)


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
        raise ValueError(f"unsupported bit-width {bits}: integer formats take 1..8 bits (symmetric 2..8)")
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


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a ``(rows, cols)`` matrix as ``(rows, n_groups, g)`` groups along the columns.

    ``group_size`` is a positive divisor of ``cols``, :data:`PER_CHANNEL` or :data:`PER_TENSOR`.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if group_size == PER_TENSOR:
        return w.reshape(1, 1, rows * cols)
    g = cols if group_size == PER_CHANNEL else group_size
    if g <= 0 or cols % g:
        raise ValueError(f"group size {group_size} does not divide the input dimension {cols}")
    return w.reshape(rows, cols // g, g)


@dataclass
class QuantizedWeight:
    """Integer codes of a ``(rows, cols)`` weight with per-group scale and zero-point.

    ``codes``: uint8 ``(rows, cols)``; ``scale``, ``zero``: ``(rows, n_groups)`` (or ``(1, 1)``
    per-tensor), float, with ``zero`` integer-valued. This is the unpacked form solvers return;
    :mod:`qbayes.formats.packing` turns it into real low-bit storage.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.codes.shape
        c = group_view(self.codes, self.group_size)
        w = dequantize(c, self.scale.to(dtype).unsqueeze(-1), self.zero.to(dtype).unsqueeze(-1))
        return w.reshape(rows, cols)

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """Split along the output dimension (undoes a row-wise concatenation of layers)."""
        if self.group_size == PER_TENSOR:
            raise ValueError("per-tensor quantized weights cannot be split by rows")
        parts = zip(self.codes.split(sizes), self.scale.split(sizes), self.zero.split(sizes))
        return [QuantizedWeight(c, s, z, self.bits, self.group_size, self.symmetric) for c, s, z in parts]
