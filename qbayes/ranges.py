r"""Choosing each group's quantization range.

* :func:`minmax_params`: the group's min and max.
* :func:`mse_params`: grid search over ranges shrunk by a factor ``p`` in
  ``{1, 1 - 1/G, ..., 1 - maxshrink}``, keeping per group the one that minimises
  :math:`\sum_j d_j\,|w_j - \hat w_j|^{\,norm}` where ``d`` is an optional per-input weight
  (e.g. ``diag(H)``, making the search activation-aware). This is the ``mse`` option of the
  reference GPTQ quantizer (Frantar et al. 2022), with the optional weighting added.

Both work on a grouped tensor ``(..., g)`` and return ``(scale, zero)`` of shape ``(...)``, in
any registered number format: the range becomes parameters through the format's
``params_from_range`` and each candidate's error through its ``fake_quantize``.
"""
from __future__ import annotations

import torch

from .spec import QuantSpec


def minmax_params(wg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero from the min and max of each group of ``wg`` (shape ``(..., g)``)."""
    return spec.fmt.params_from_range(wg.amin(-1), wg.amax(-1), spec.bits, spec.symmetric, spec.torch_scale_dtype)


def mse_params(
    wg: torch.Tensor,
    spec: QuantSpec,
    weight: torch.Tensor | None = None,
    grid: int = 80,
    maxshrink: float = 0.75,
    norm: float = 2.4,
    coarse: int = 4,
    chunk_elems: int = 1 << 23,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero minimising the (optionally weighted) ``norm``-error of each group.

    Candidates are the ranges shrunk by ``1 - i/grid`` for ``0 <= i <= maxshrink*grid``. They
    are searched coarse to fine: every ``coarse``-th one first, then, per group, the ones
    between the best coarse candidate's neighbours (``coarse=1`` searches all). Ties keep the
    widest range, so the result is never worse than min-max.

    Args:
        wg: grouped weights ``(..., g)``.
        weight: non-negative importance broadcastable to ``wg`` (e.g. ``diag(H)`` per input).
        norm: exponent of the error (2.4 as in the reference GPTQ).
        chunk_elems: bound on the candidates evaluated at once (memory).
    """
    xmin, xmax = wg.amin(-1), wg.amax(-1)
    last = int(maxshrink * grid)
    shape = (-1, *([1] * xmin.dim()))
    idx = torch.arange(0, last + 1, coarse, device=wg.device).view(shape).expand(-1, *xmin.shape)
    best_i, best_s, best_z, best_e = _search(wg, xmin, xmax, idx, spec, weight, norm, grid, chunk_elems)
    if coarse > 1:
        off = torch.arange(-coarse + 1, coarse, device=wg.device).view(shape)
        idx = (best_i.unsqueeze(0) + off[off != 0].view(shape)).clamp(0, last)
        i2, s2, z2, e2 = _search(wg, xmin, xmax, idx, spec, weight, norm, grid, chunk_elems)
        better = (e2 < best_e) | ((e2 == best_e) & (i2 < best_i))
        best_s, best_z = torch.where(better, s2, best_s), torch.where(better, z2, best_z)
    return best_s, best_z


def _search(wg, xmin, xmax, idx, spec, weight, norm, grid, chunk_elems):
    """Best of the candidate shrink indices ``idx`` ``(candidates, ...)`` for each group."""
    best = None
    per = max(1, chunk_elems // max(1, wg.numel()))
    for ic in idx.split(per):
        p = 1.0 - ic.to(wg.dtype) / grid
        s, z = spec.fmt.params_from_range(p * xmin, p * xmax, spec.bits, spec.symmetric, spec.torch_scale_dtype)
        err = _err(wg, s, z, spec, weight, norm)
        e = err.min(0).values
        # among candidates reaching the minimum, the smallest shrink index (widest range)
        k = torch.where(err == e, ic, torch.full_like(ic, 1 << 30)).argmin(0, keepdim=True)
        cand = (ic.gather(0, k)[0], s.gather(0, k)[0], z.gather(0, k)[0], e)
        if best is None:
            best = cand
        else:
            better = (cand[3] < best[3]) | ((cand[3] == best[3]) & (cand[0] < best[0]))
            best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
    return best


def _err(wg, s, z, spec, weight, norm):
    e = (spec.fmt.fake_quantize(wg, s.unsqueeze(-1), z.unsqueeze(-1), spec.bits) - wg).abs_()
    e = e.square_() if norm == 2 else e.pow_(norm)
    if weight is not None:
        e = e * weight
    return e.sum(-1)


def choose_params(
    wg: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on ``spec.clip``."""
    if spec.clip == "minmax":
        return minmax_params(wg, spec)
    return mse_params(wg, spec, weight=weight)
