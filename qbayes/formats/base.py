r"""What every number format shares: granularity, storage-dtype scales, the :class:`Format`
interface the registry holds, and :class:`QuantizedWeight`, the unpacked result of a solver.

A format maps a weight ``w`` to an unsigned code ``c`` with per-group parameters ``(s, z)`` and
back, ``ŵ = decode(c, s, z)``. Solvers never assume ``ŵ = s (c − z)``: they call the format's
:meth:`Format.encode` / :meth:`Format.decode`; runtime modules, kernels and exporters ask
:attr:`Format.affine` whether the integer-affine fast paths apply, and fall back to
:meth:`Format.dequantize_packed` otherwise.

Granularity is expressed by reshaping a ``(rows, cols)`` matrix into groups along the input
(column) dimension: ``group_size = g`` gives ``(rows, cols/g, g)``; per-channel is one group of
``cols``; per-tensor is one group of ``rows*cols``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .packing import packed_length, unpack
from ..errors import QBayesError

PER_CHANNEL = -1
PER_TENSOR = 0


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


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a ``(rows, cols)`` matrix as ``(rows, n_groups, g)`` groups along the columns.

    ``group_size`` is a positive divisor of ``cols``, :data:`PER_CHANNEL` or :data:`PER_TENSOR`.
    """
    if w.dim() != 2:
        raise QBayesError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if group_size == PER_TENSOR:
        return w.reshape(1, 1, rows * cols)
    g = cols if group_size == PER_CHANNEL else group_size
    if g <= 0 or cols % g:
        raise QBayesError(f"group size {group_size} does not divide the input dimension {cols}")
    return w.reshape(rows, cols // g, g)


class Format(ABC):
    """A number format: fits per-group parameters, encodes, decodes, states its storage.

    Codes are unsigned integers in ``[0, 2^bits)`` (kept as exact integers in a float tensor
    while a solver works, ``uint8`` once final) and are bit-packed by :mod:`.packing`;
    parameters are a per-group ``scale`` (stored in the spec's scale dtype) and ``zero``
    (stored, packed like the codes, only when :meth:`stores_zero` says so).
    """

    name: str = ""
    #: one line for ``--help`` and error messages
    summary: str = ""
    #: ``ŵ = s (c − z)`` with integer codes: the integer kernels and exporters apply
    affine: bool = False

    @abstractmethod
    def check(self, bits: int, group_size: int, symmetric: bool) -> str | None:
        """``None`` if the format can take these settings, else what is wrong and what to do."""

    @abstractmethod
    def params_from_range(self, xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool,
                          scale_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` per group for the value range ``[xmin, xmax]`` (elementwise)."""

    @abstractmethod
    def encode(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        """Codes of ``w`` as exact integers in ``w``'s float dtype (parameters broadcast)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Values of ``codes`` in the dtype of ``scale`` (parameters broadcast)."""

    @abstractmethod
    def stores_zero(self, symmetric: bool) -> bool:
        """Whether per-group zero-points are stored (packed at the code width)."""

    @abstractmethod
    def default_zero(self, bits: int) -> float:
        """The zero-point used when none is stored."""

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        """Encode then decode (simulation only; stores nothing)."""
        return self.decode(self.encode(w, scale, zero, bits), scale, zero)

    def dequantize_packed(self, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                          bits: int, in_features: int, group_cols: int,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``(out, in)`` weight from packed storage: the reference every kernel is tested against."""
        out = qweight.shape[0]
        n_groups = scales.shape[1]
        codes = unpack(qweight, bits, in_features).reshape(out, n_groups, group_cols)
        s = scales.to(dtype).unsqueeze(-1)
        if qzeros is None:
            z = torch.full((), self.default_zero(bits), dtype=dtype, device=s.device)
        else:
            z = unpack(qzeros, bits, n_groups).to(dtype).unsqueeze(-1)
        return self.decode(codes, s, z).reshape(out, in_features)

    def storage_bytes(self, out_features: int, in_features: int, bits: int, group_cols: int, symmetric: bool,
                      scale_bytes: int) -> dict[str, int]:
        """``{"code": bytes, "overhead": bytes}`` of one packed ``(out, in)`` matrix (bias excluded)."""
        groups = in_features // group_cols
        over = out_features * groups * scale_bytes
        if self.stores_zero(symmetric):
            over += out_features * packed_length(groups, bits)
        return {"code": out_features * packed_length(in_features, bits), "overhead": over}


@dataclass
class QuantizedWeight:
    """Codes of a ``(rows, cols)`` weight with per-group parameters, in the named format.

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
    format: str = "int"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from .registry import get_format

        rows, cols = self.codes.shape
        c = group_view(self.codes, self.group_size)
        w = get_format(self.format).decode(c, self.scale.to(dtype).unsqueeze(-1), self.zero.to(dtype).unsqueeze(-1))
        return w.reshape(rows, cols)

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """Split along the output dimension (undoes a row-wise concatenation of layers)."""
        if self.group_size == PER_TENSOR:
            raise QBayesError("per-tensor quantized weights cannot be split by rows: quantize the layers separately or per channel/group")
        parts = zip(self.codes.split(sizes), self.scale.split(sizes), self.zero.split(sizes))
        return [QuantizedWeight(c, s, z, self.bits, self.group_size, self.symmetric, self.format) for c, s, z in parts]
