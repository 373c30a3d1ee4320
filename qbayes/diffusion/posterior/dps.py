r"""Diffusion Posterior Sampling (Chung, Kim, Mccann, Klasky & Ye 2023, "Diffusion Posterior Sampling
for General Noisy Inverse Problems", ICLR; Algorithm 1).

Each step takes the unconditional DDIM(η) move of :mod:`.common` (η = 1, DDPM's ancestral step,
is the paper's) from ``x_t`` to ``x'_s``, then a gradient step on the measurement residual through
Tweedie's estimate, differentiated through ``eps_model`` by autograd:

.. math:: x_s = x'_s - ζ\,\nabla_{x_t} \lVert y - A(x̂_0(x_t)) \rVert       \qquad (\text{guidance="norm"})

the normalised step of the paper: its eq. (16), :math:`x'_s − ζ_t ∇\lVert y − A x̂_0\rVert^2` with
:math:`ζ_t = ζ'/\lVert y − A x̂_0\rVert`, is this with ``ζ = 2ζ'``; the authors' code takes ``ζ``
(their ``scale``, 1.0 by default, as here) on the norm's gradient. The Gaussian log-likelihood
form (``guidance="likelihood"``) uses the operator's likelihood (probit for :class:`Sign`):

.. math:: x_s = x'_s + ζ\,\nabla_{x_t} \log p(y \mid x̂_0(x_t)),

with ``ζ = σ_y²`` by default, which for a Gaussian likelihood is a unit gradient step on
``½‖y − A x̂_0‖²`` (eq. 16 with constant ``ζ_t = ½``). DPS ignores the spread of
``p(x_0 | x_t)`` around ``x̂_0``, so its samples are biased (it is not a posterior sampler in the
exact sense; :func:`~qbayes.diffusion.posterior.smc` is).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...errors import QBayesError
from ..schedule import EpsModel, Schedule
from .common import check_eta, check_positive, ddim_coefficients, levels, problem, randn, tweedie


def dps(eps_model: EpsModel, schedule: Schedule, operator, y, sigma_y: float, n: int, steps: int = 1000,
        generator: torch.Generator | None = None, progress: bool = False, *, scale: float | None = None,
        guidance: str = "norm", eta: float = 1.0, shape: tuple | None = None, dtype: torch.dtype = torch.float32,
        device=None) -> torch.Tensor:
    """``n`` DPS samples ``(n, *shape)`` for the measurement ``y`` (``(*out_shape)`` or
    ``(1, *out_shape)``) of ``operator`` with noise std ``sigma_y``, over ``steps`` timesteps
    (module docstring). ``scale`` is ``ζ`` (default 1.0 for ``"norm"``, ``σ_y²`` for
    ``"likelihood"``)."""
    if guidance not in ("norm", "likelihood"):
        raise QBayesError(f"guidance must be 'norm' or 'likelihood', got {guidance!r}")
    P = problem(schedule, operator, y, sigma_y, n, steps, shape, dtype, device, noiseless_ok=guidance == "norm")
    eta = check_eta(eta)
    if guidance == "norm" and not operator.linear:
        raise QBayesError(f"DPS's norm step needs a linear operator; use guidance='likelihood' for "
                          f"{type(operator).__name__}")
    zeta = check_positive(scale if scale is not None else (1.0 if guidance == "norm" else P.sigma_y ** 2), "scale")
    x = randn((n, *P.shape), generator, dtype, P.device)
    for t in tqdm(P.timesteps, desc="DPS", unit="step", disable=not progress):
        a_t, a_s = levels(schedule, t, P.stride)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            eps, x0 = tweedie(eps_model, x, t, a_t)
            if guidance == "norm":
                r = (P.y - operator.forward(x0)).reshape(n, -1)
                loss = ((r * r).sum(1) + 1e-30).sqrt().sum()    # Σ_b ‖y − A x̂_0,b‖ (rows independent)
            else:
                loss = -operator.log_likelihood(x0, P.y, P.sigma_y).sum()
            g = torch.autograd.grad(loss, x)[0]
        c0, ce, sd = ddim_coefficients(a_t, a_s, eta)
        x = c0 * x0.detach() + ce * eps.detach() - zeta * g
        if sd > 0:
            x = x + sd * randn(x.shape, generator, dtype, P.device)
    return x.detach()
