r"""The layer-input second moment, the one statistic every client shares.

For a linear layer ``y = W x`` the expected squared output error of replacing ``W`` by ``Q`` is

.. math::  \mathbb E\,\|(W - Q)\,x\|^2 = \operatorname{tr}\big((W - Q)\,H\,(W - Q)^\top\big) / 2,
           \qquad H = \frac{2}{n} \sum_{i=1}^n x_i x_i^\top .

``H`` (the Hessian of that objective, as in GPTQ) is the input-side Kronecker factor of the
layer's Gauss-Newton curvature, which is what K-FAC Laplace and Hessian-aware bit allocation
also use. It is accumulated as a running mean over calibration tokens so it never needs all
activations in memory.
"""
from __future__ import annotations

import torch

from ..errors import QBayesError


class InputSecondMoment:
    """Running ``H = (2/n) Σ x xᵀ`` over the rows of inputs of width ``dim``.

    Only the blocks on and below the diagonal are accumulated (``H`` is symmetric), which
    saves up to half the multiply-adds on wide inputs; :attr:`H` returns the full matrix.

    Args:
        dim: input features.
        dtype: accumulation dtype (float32 by default; float64 for reference checks).
        device: where ``H`` lives.
        chunks: number of diagonal blocks (default: by width).
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 chunks: int | None = None):
        self.dim = dim
        self.n = 0
        self._acc = torch.zeros(dim, dim, dtype=dtype, device=device)
        k = chunks or (1 if dim < 256 else 2 if dim < 1024 else 4)
        step = -(-dim // k)
        self._bounds = [(a, min(a + step, dim)) for a in range(0, dim, step)]
        self._full: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` of shape ``(..., dim)`` (every leading index is a sample)."""
        if x.shape[-1] != self.dim:
            raise QBayesError(f"input width {x.shape[-1]} does not match statistic width {self.dim}")
        x = x.reshape(-1, self.dim).to(self._acc.dtype)
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        beta, alpha = self.n / total, 2.0 / total
        for bi, (a, b) in enumerate(self._bounds):  # H <- H n/total + (2/total) xᵀx, lower blocks
            xa = x[:, a:b]
            for c, d in self._bounds[: bi + 1]:
                self._acc[a:b, c:d].addmm_(xa.T, x[:, c:d], beta=beta, alpha=alpha)
        self.n = total
        self._full = None

    @property
    def H(self) -> torch.Tensor:
        """The full symmetric ``H`` (computed from the lower blocks, cached until the next update)."""
        if self._full is None:
            full = self._acc.clone()
            for bi, (a, b) in enumerate(self._bounds):
                for c, d in self._bounds[:bi]:
                    full[c:d, a:b] = full[a:b, c:d].T
            self._full = full
        return self._full

    def merge(self, other: "InputSecondMoment") -> None:
        """Combine with a statistic accumulated elsewhere (same width)."""
        total = self.n + other.n
        if total:
            self._acc.mul_(self.n / total).add_(other.H.to(self._acc), alpha=other.n / total)
            self._full = None
        self.n = total


class InputCrossMoment:
    """Running ``C = (2/n) Σ u vᵀ`` over paired rows of two inputs of width ``dim`` (the same
    scaling as :class:`InputSecondMoment`, so ``C`` of a stream with itself is its ``H``).

    Float-target calibration pairs the float model's input of a layer (``u``) with the
    quantized model's input (``v``)."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.dim = dim
        self.n = 0
        self.C = torch.zeros(dim, dim, dtype=dtype, device=device)

    def update(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Add paired batches ``u``, ``v`` of the same shape ``(..., dim)``."""
        if u.shape != v.shape or u.shape[-1] != self.dim:
            raise QBayesError(f"paired inputs of shapes {tuple(u.shape)} and {tuple(v.shape)} do not match "
                              f"a cross moment of width {self.dim}")
        u = u.reshape(-1, self.dim).to(self.C.dtype)
        v = v.reshape(-1, self.dim).to(self.C.dtype)
        m = u.shape[0]
        if m == 0:
            return
        total = self.n + m
        self.C.mul_(self.n / total).addmm_(u.T, v, alpha=2.0 / total)
        self.n = total


def grouped_conv_moment(conv, xs, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-group input second moments ``(groups, d, d)`` of a grouped (e.g. depthwise) ``Conv2d``,
    ``d = in/groups · kh · kw``: output channels of group ``g`` only read the im2col patches of
    that group's input channels, so each group has its own ``H_g = (2/n) Σ x_g x_gᵀ``."""
    from torch import nn

    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise QBayesError("grouped_conv_moment takes zero padding given as numbers")
    acc, n = None, 0
    for x in xs:
        cols = nn.functional.unfold(x.to(dtype), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        b, _, L = cols.shape
        cols = cols.view(b, conv.groups, -1, L)
        s = torch.einsum("bgdl,bgel->gde", cols, cols)
        acc = s if acc is None else acc + s
        n += b * L
    if acc is None:
        raise QBayesError("grouped_conv_moment saw no inputs")
    return 2.0 * acc / n
