r"""Pseudoinverse-guided diffusion models, ΠGDM (Song, Vahdat, Mardani & Kautz 2023,
"Pseudoinverse-Guided Diffusion Models for Inverse Problems", ICLR), for linear operators.

ΠGDM approximates :math:`p(x_0 \mid x_t) ≈ N(x̂_0, r_t^2 I)`, so that
:math:`p(y \mid x_t) ≈ N(y; A x̂_0, r_t^2 A A^T + σ_y^2 I)`, and guides with the gradient of its
log in ``x_t``, a vector-Jacobian product through ``eps_model``:

.. math:: g = \Bigl((y - A x̂_0)^T (r_t^2 A A^T + σ_y^2 I)^{-1} A \,\frac{∂x̂_0}{∂x_t}\Bigr)^T,
          \qquad r_t^2 = \frac{v(1-ᾱ_t)}{1-ᾱ_t + vᾱ_t}

(``v = data_var``; ``v = 1`` is the paper's :math:`r_t^2 = σ_t^2/(1+σ_t^2)`, i.e. ``1 − ᾱ_t``).
The ``m × m`` solve is the operator's ``solve_gram``: diagonal for :class:`Mask` and
:class:`Downsample`, an SVD for dense ones. ``g`` enters the DDIM(η) move as a conditional score,
:math:`ε̃ = ε̂ − ζ\sqrt{1-ᾱ_t}\,g` and :math:`x̃_0 = x̂_0 + ζ\frac{1-ᾱ_t}{\sqrt{ᾱ_t}} g` (consistent:
``x_t = √ᾱ_t x̃_0 + √(1−ᾱ_t) ε̃``), then
:math:`x_s = \sqrt{ᾱ_s}\,x̃_0 + \sqrt{1-ᾱ_s-σ_t^2}\,ε̃ + σ_t z`. For a unit-variance Gaussian prior
``x̃_0`` is exactly ``E[x_0 | x_t, y]``, and as ``σ_y → 0`` the last step returns a sample with
``A x = y``. The ΠGDM code in the authors' RED-diff repository weights its (noiseless,
pseudo-inverse) guidance by ``√ᾱ_s √ᾱ_t`` instead, far weaker at high noise; ``scale`` (``ζ``,
default 1) rescales ``g`` here.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ...errors import QBayesError
from ..schedule import EpsModel, Schedule
from .common import (check_eta, check_positive, ddim_coefficients, levels, pigdm_r2, pigdm_vector, problem,
                     randn, tweedie)


def pigdm(eps_model: EpsModel, schedule: Schedule, operator, y, sigma_y: float, n: int, steps: int = 100,
          generator: torch.Generator | None = None, progress: bool = False, *, scale: float = 1.0, eta: float = 1.0,
          data_var: float = 1.0, shape: tuple | None = None, dtype: torch.dtype = torch.float32,
          device=None) -> torch.Tensor:
    """``n`` ΠGDM samples ``(n, *shape)`` for ``y`` of a linear ``operator`` (module docstring);
    ``sigma_y = 0`` is allowed (noiseless measurement)."""
    if not operator.linear:
        raise QBayesError(f"ΠGDM needs a linear operator, got {type(operator).__name__}")
    P = problem(schedule, operator, y, sigma_y, n, steps, shape, dtype, device)
    eta, zeta, v = check_eta(eta), check_positive(scale, "scale"), check_positive(data_var, "data_var")
    x = randn((n, *P.shape), generator, dtype, P.device)
    for t in tqdm(P.timesteps, desc="PiGDM", unit="step", disable=not progress):
        a_t, a_s = levels(schedule, t, P.stride)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            eps, x0 = tweedie(eps_model, x, t, a_t)
            u, _ = pigdm_vector(operator, x0, P.y, P.sigma_y, pigdm_r2(a_t, v))
            g = torch.autograd.grad(x0, x, operator.adjoint(u))[0]
        eps_c = eps.detach() - zeta * math.sqrt(1 - a_t) * g
        x0_c = x0.detach() + zeta * (1 - a_t) / math.sqrt(a_t) * g
        c0, ce, sd = ddim_coefficients(a_t, a_s, eta)
        x = c0 * x0_c + ce * eps_c
        if sd > 0:
            x = x + sd * randn(x.shape, generator, dtype, P.device)
    return x.detach()
