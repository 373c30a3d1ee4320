"""`QuantConv2d`: a 2-D convolution whose weight is stored as packed low-bit codes.

The ``(out, in/groups, kh, kw)`` kernel is quantized as the ``(out, in/groups · kh · kw)`` matrix
a convolution multiplies its unfolded (im2col) input by — the same matrix the solvers see —
so the storage is :class:`~qbayes.nn.QuantLinear`'s (codes packed along that flattened input,
per-output-channel or grouped scales, zero-points where the format stores them). The forward
pass dequantizes through the format and runs ``torch.nn.functional.conv2d``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import QBayesError
from ..formats import QuantizedWeight
from ..spec import QuantSpec
from .quant_linear import QuantLinear
from .surgery import weight_matrix


def check_conv(conv: nn.Conv2d, name: str = "conv") -> None:
    """Refuse a convolution ``QuantConv2d`` cannot reproduce (padding other than zeros given as numbers)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) and conv.padding != "valid":
        raise QBayesError(f"{name}: convolutions are quantized with zero padding given as numbers, not "
                          f"padding={conv.padding!r} padding_mode={conv.padding_mode!r}; exclude it or rebuild it")


class QuantConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, spec: QuantSpec, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, bias_dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_channels % groups or out_channels % groups:
            raise QBayesError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.spec = spec
        # the packed storage of the (out, in/groups*kh*kw) matrix
        self.packed = QuantLinear(in_channels // groups * kh * kw, out_channels, spec, bias=bias,
                                  bias_dtype=bias_dtype, device=device)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, spec: QuantSpec, conv: nn.Conv2d,
                       bias_dtype: torch.dtype = torch.float16) -> "QuantConv2d":
        """Pack ``qw`` (a solver's result for :func:`~qbayes.nn.weight_matrix` of ``conv``) with ``conv``'s geometry."""
        check_conv(conv)
        expect = tuple(weight_matrix(conv).shape)
        if tuple(qw.codes.shape) != expect:
            raise QBayesError(f"quantized weight of shape {tuple(qw.codes.shape)} does not fit the conv matrix {expect}")
        padding = 0 if conv.padding == "valid" else conv.padding
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, spec, conv.stride, padding, conv.dilation,
                conv.groups, bias=conv.bias is not None, bias_dtype=bias_dtype, device=qw.codes.device)
        m.packed.fill(qw, conv.bias)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = self.packed.dequantize(dtype)
        return w.view(self.out_channels, self.in_channels // self.groups, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        bias = None if self.packed.bias is None else self.packed.bias.to(dtype)
        return F.conv2d(x, self.dequantize(dtype), bias, self.stride, self.padding, self.dilation, self.groups)

    def storage_bytes(self) -> int:
        return self.packed.storage_bytes()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, spec={self.spec}")
