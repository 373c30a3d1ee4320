r"""A float low-rank branch beside a (quantized) linear or convolution: SVDQuant's
``y = Q(x) Q(R)ᵀ + x L_1 L_2`` (Li et al. 2024, "SVDQuant: Absorbing Outliers by Low-Rank
Components for 4-Bit Diffusion Models"), where the layer's own weight holds the residual ``R``
and the branch ``L = L_2 L_1`` (rank ``r``) runs on the layer's *unquantized* input.

For a convolution the branch is a rank-``r`` convolution with the layer's geometry (its kernel,
stride, padding, dilation) followed by a ``1×1`` one: ``L_1`` is ``(r, in · kh · kw)``, the first
factor of the ``(out, in · kh · kw)`` matrix a convolution multiplies its im2col patches by
(groups of 1 only). :func:`attach_lowrank` makes the branch the layer's child ``lowrank`` and adds
its output in a forward hook; a forward pre-hook registered *first* keeps the input the layer
received before its input quantizer (:mod:`.act_quant`) changes it (one stack per greenlet, as
the calibration driver interleaves forward passes). Module surgery
(:func:`~.surgery.packed_like`) carries the branch over to the packed module. The factors
themselves come from :func:`qbayes.transforms.lowrank.split_lowrank_`.
"""
from __future__ import annotations

import torch
from greenlet import getcurrent
from torch import nn
from torch.nn import functional as F

from ..errors import QBayesError


class LowRankBranch(nn.Module):
    """``down`` ``(r, in · kh · kw)`` and ``up`` ``(out, r)``; ``conv`` the geometry
    ``(kh, kw, stride, padding, dilation)`` of a convolution's branch, ``None`` for a linear."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, conv: tuple | None = None):
        super().__init__()
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise QBayesError(f"low-rank factors must be (r, in) and (out, r), got {tuple(down.shape)} and "
                              f"{tuple(up.shape)}")
        self.down = nn.Parameter(down.detach().clone(), requires_grad=False)
        self.up = nn.Parameter(up.detach().clone(), requires_grad=False)
        self.conv = conv
        self._stash: dict[int, list[torch.Tensor]] = {}  # float inputs per execution context (greenlet)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, u = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv is None:
            return F.linear(F.linear(x, d), u)
        kh, kw, stride, padding, dilation = self.conv
        h = F.conv2d(x, d.view(self.rank, -1, kh, kw), None, stride, padding, dilation)
        return F.conv2d(h, u.view(u.shape[0], self.rank, 1, 1))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, in={self.down.shape[1]}, out={self.up.shape[0]}, conv={self.conv is not None}"


def branch_geometry(layer: nn.Module) -> tuple | None:
    """The convolution geometry a branch of ``layer`` needs (``None`` for a linear)."""
    if not hasattr(layer, "kernel_size"):
        return None
    if getattr(layer, "groups", 1) != 1:
        raise QBayesError(f"a low-rank branch needs an ungrouped convolution, got groups={layer.groups}")
    kh, kw = layer.kernel_size
    return kh, kw, layer.stride, layer.padding, layer.dilation


def _context() -> int:
    """The execution context: qbayes's calibration interleaves forward passes as greenlets, so
    the input kept by the pre-hook is the one of the same greenlet."""
    return id(getcurrent())


def _keep_input(module, args):
    module.lowrank._stash.setdefault(_context(), []).append(args[0])


def _add_branch(module, args, out):
    stack = module.lowrank._stash[_context()]
    x = stack.pop()
    if not stack:
        del module.lowrank._stash[_context()]
    return out + module.lowrank(x).to(out.dtype)


def attach_lowrank(layer: nn.Module, branch: LowRankBranch) -> LowRankBranch:
    """Make ``branch`` add its output to ``layer``'s (child ``lowrank`` and two hooks)."""
    if hasattr(layer, "lowrank"):
        raise QBayesError("this layer already has a low-rank branch")
    layer.lowrank = branch
    layer._lowrank_hooks = (layer.register_forward_pre_hook(_keep_input, prepend=True),
                            layer.register_forward_hook(_add_branch))
    return branch
