r"""SVDQuant's low-rank split (Li et al. 2024): ``W = L + R`` with ``L`` the best rank-``r``
approximation of the layer's weight matrix (truncated SVD, ``L = U_r S_r V_rᵀ``), kept in float as
a branch on the layer's unquantized input, and the residual ``R = W − L`` left in the layer for
the weight quantizer. The residual has the large singular directions, which carry the outlier
weights, removed, so its range (and a 4-bit grid on it) is tighter; the branch costs
``r (in + out)`` float weights per layer.

Function-preserving in float: after :func:`split_lowrank_` the layer computes
``R x + L x = W x`` up to rounding. Applied to float ``nn.Linear`` / ungrouped ``nn.Conv2d``
layers before ``qbayes.quantize_``, which keeps the branch when it packs the layer. (SVDQuant
also smooths the activations into the weights first; this transform is the low-rank half.)
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import QBayesError
from ..nn.lowrank import LowRankBranch, attach_lowrank, branch_geometry
from ..nn.surgery import weight_matrix


def lowrank_factors(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` with ``up @ down`` the best rank-``rank`` approximation of ``W`` (Frobenius
    and spectral norm, Eckart-Young), split as ``down = S_r^{1/2} V_rᵀ``, ``up = U_r S_r^{1/2}``;
    computed in float64."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(W.shape):
        raise QBayesError(f"rank must be an int from 1 to min{tuple(W.shape)} = {min(W.shape)}, got {rank!r}")
    if not bool(torch.isfinite(W).all()):
        raise QBayesError("the weight holds NaN or inf: no low-rank split of it")
    U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    r = S[:rank].sqrt()
    return (r[:, None] * Vh[:rank]).to(W.dtype), (U[:, :rank] * r).to(W.dtype)


def split_lowrank_(layers: Mapping[str, nn.Module], rank: int | float) -> dict[str, dict]:
    """Give every layer of ``{name: layer}`` a float rank-``r`` branch and leave the residual in its
    weight. ``rank``: an int, or a fraction of ``min(out, in · kh · kw)`` (rounded, at least 1).
    Returns ``{name: {"rank", "branch_params", "residual_rel"}}`` (``residual_rel`` is
    ``‖R‖_F / ‖W‖_F``)."""
    report = {}
    for name, layer in layers.items():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise QBayesError(f"{name}: the low-rank split takes float nn.Linear / nn.Conv2d layers, not "
                              f"{type(layer).__name__} (split before quantizing)")
        W = weight_matrix(layer).detach().clone()  # not a view: the layer weight is overwritten below
        r = rank if isinstance(rank, int) and not isinstance(rank, bool) else _fraction(rank, W)
        r = min(r, min(W.shape)) if isinstance(rank, int) else r
        down, up = lowrank_factors(W, r)
        geometry = branch_geometry(layer)
        with torch.no_grad():
            R = W - up @ down
            layer.weight.copy_(R.view_as(layer.weight))
        attach_lowrank(layer, LowRankBranch(down, up, geometry))
        report[name] = {"rank": r, "branch_params": down.numel() + up.numel(),
                        "residual_rel": float(R.norm() / W.norm().clamp(min=1e-30))}
    return report


def _fraction(frac, W: torch.Tensor) -> int:
    if isinstance(frac, bool) or not isinstance(frac, float) or not 0 < frac <= 1:
        raise QBayesError(f"rank must be a positive int or a fraction in (0, 1], got {frac!r}")
    return max(1, round(frac * min(W.shape)))
