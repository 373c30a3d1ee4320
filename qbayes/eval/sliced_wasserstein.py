r"""The sliced Wasserstein distance between two empirical samples (Rabin, Peyré, Delon & Bernot
2011; Bonneel et al. 2015):

.. math:: SW_p(μ, ν) = \Bigl(E_{θ \sim U(S^{d-1})}\, W_p^p(θ_\# μ, θ_\# ν)\Bigr)^{1/p},

estimated with ``projections`` random directions. In one dimension
:math:`W_p^p = \int_0^1 |F^{-1}(u) - G^{-1}(u)|^p du`, computed exactly for empirical
measures: the quantile functions are step functions, constant between the breakpoints
``i/n_x`` and ``j/n_y``, so the integral is a finite sum over the merged breakpoints (equal
sizes: the mean of ``|x_(i) − y_(i)|^p`` over the sorted samples).

For ``N(m_1, s_1² I)`` and ``N(m_2, s_2² I)`` in ``d`` dimensions every projection is a pair of
1-D Gaussians with :math:`W_2^2 = (θ^T Δm)^2 + (s_1 - s_2)^2`, and :math:`E(θ^TΔm)^2 = ‖Δm‖²/d`:
:math:`SW_2^2 = ‖Δm‖^2/d + (s_1 - s_2)^2`.
"""
from __future__ import annotations

import torch

from ..errors import QBayesError


def sliced_wasserstein(x, y, projections: int = 256, p: float = 2, generator: torch.Generator | None = None,
                       directions: torch.Tensor | None = None) -> float:
    """``SW_p`` between the rows of ``x`` ``(n_x, *shape)`` and ``y`` ``(n_y, *shape)`` (flattened;
    float64), with ``projections`` directions drawn by ``generator`` (or the given unit
    ``directions`` ``(projections, d)``, to compare several samples on the same slices)."""
    x, y = _rows(x, "x"), _rows(y, "y")
    if x.shape[1] != y.shape[1]:
        raise QBayesError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or p < 1:
        raise QBayesError(f"p must be a number >= 1, got {p!r}")
    if directions is None:
        if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
            raise QBayesError(f"projections must be a positive int, got {projections!r}")
        directions = random_directions(projections, x.shape[1], generator)
    th = torch.as_tensor(directions, dtype=torch.float64)
    if th.dim() != 2 or th.shape[1] != x.shape[1]:
        raise QBayesError(f"directions must be (projections, {x.shape[1]}), got {tuple(th.shape)}")
    xs = torch.sort(x @ th.T, 0).values                      # (n_x, P) sorted projections
    ys = torch.sort(y @ th.T, 0).values
    nx, ny = xs.shape[0], ys.shape[0]
    if nx == ny:
        cost = (xs - ys).abs().pow(p).mean(0)
    else:
        u = torch.unique(torch.cat([torch.arange(1, nx + 1, dtype=torch.float64) / nx,
                                    torch.arange(1, ny + 1, dtype=torch.float64) / ny]))
        width = torch.diff(u, prepend=u.new_zeros(1))
        mid = u - width / 2
        ix = (mid * nx).floor().long().clamp(max=nx - 1)
        iy = (mid * ny).floor().long().clamp(max=ny - 1)
        cost = ((xs[ix] - ys[iy]).abs().pow(p) * width.unsqueeze(1)).sum(0)
    return float(cost.mean() ** (1.0 / p))


def random_directions(projections: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``projections`` directions uniform on the unit sphere in ``d`` dimensions, float64."""
    th = torch.randn(projections, d, generator=generator, dtype=torch.float64)
    return th / th.norm(dim=1, keepdim=True)


def _rows(a, name: str) -> torch.Tensor:
    a = torch.as_tensor(a).detach().cpu().to(torch.float64)
    if a.dim() == 1:
        a = a.unsqueeze(1)
    a = a.reshape(a.shape[0], -1)
    if a.shape[0] < 1:
        raise QBayesError(f"{name} has no samples")
    if not bool(torch.isfinite(a).all()):
        raise QBayesError(f"{name} contains NaN or inf")
    return a
