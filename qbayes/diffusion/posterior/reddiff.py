r"""RED-diff (Mardani, Song, Kautz & Vahdat 2023, "A Variational Perspective on Solving Inverse
Problems with Diffusion Models"; Algorithm 1): a variational point estimate.

The variational distribution is ``q = N(μ, σ²I)`` with ``σ → 0``; minimising
``KL(q ‖ p(x | y))`` over ``μ`` becomes, with the diffusion prior's score-matching bound,

.. math:: \min_μ\; -\log p(y \mid μ) + E_{t, ε}\bigl[λ_t \lVert ε_θ(x_t, t) - ε\rVert^2\bigr],
          \qquad x_t = \sqrt{ᾱ_t}\,μ + \sqrt{1-ᾱ_t}\,ε,

(``−log p(y | μ) = ‖y − A μ‖²/(2σ_y²)`` + const for a Gaussian likelihood) optimised by Adam over
the timesteps in descending order, one ``(t, ε)`` per step. The paper's stop-gradient trick drops
the denoiser's Jacobian: the prior term's gradient in ``μ`` is ``λ_t (ε_θ(x_t, t) − ε)``, i.e. the
loss is

.. math:: \frac{\lVert y - A μ\rVert^2}{2σ_y^2} + λ_t\,\mathrm{sg}\bigl[ε_θ(x_t, t) - ε\bigr]^T μ,
          \qquad λ_t = λ\,\sqrt{(1-ᾱ_t)/ᾱ_t}

(the paper's inverse-square-root-SNR weighting, its ``"linear"``; ``λ = 0.25``, Adam with
``betas = (0.9, 0.99)`` and ``μ`` started at ``A⁺ y`` as in the authors' code; zeros for a
non-linear operator). No gradient flows through ``eps_model``. ``obs_weight`` replaces
``1/σ_y²`` by a fixed weight (the authors' code uses ``‖y − Aμ‖²/2`` with weight 1; needed for
``σ_y = 0``). Each of the ``n`` runs draws its own noise, so the runs are ``n`` point estimates,
not posterior samples.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ...errors import QBayesError
from ..schedule import EpsModel, Schedule
from .common import check_positive, levels, problem, randn


def reddiff(eps_model: EpsModel, schedule: Schedule, operator, y, sigma_y: float, n: int, steps: int = 1000,
            generator: torch.Generator | None = None, progress: bool = False, *, lr: float = 0.1,
            lam: float = 0.25, obs_weight: float | None = None, init: str = "pinv", shape: tuple | None = None,
            dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``n`` independent RED-diff estimates ``(n, *shape)`` (module docstring)."""
    P = problem(schedule, operator, y, sigma_y, n, steps, shape, dtype, device, noiseless_ok=obs_weight is not None)
    lr, lam = check_positive(lr, "lr"), check_positive(lam, "lam")
    if init not in ("pinv", "zeros"):
        raise QBayesError(f"init must be 'pinv' or 'zeros', got {init!r}")
    if obs_weight is not None:
        obs_weight = check_positive(obs_weight, "obs_weight")
        if not operator.linear:
            raise QBayesError("obs_weight (a squared-residual loss) needs a linear operator")
    if init == "pinv" and operator.linear:
        mu0 = operator.pinv(P.y).expand(n, *P.shape)
    else:
        mu0 = torch.zeros((n, *P.shape), dtype=dtype, device=P.device)
    mu = mu0.clone().requires_grad_(True)
    opt = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99))
    for t in tqdm(P.timesteps, desc="RED-diff", unit="step", disable=not progress):
        a_t, _ = levels(schedule, t, P.stride)
        noise = randn(mu.shape, generator, dtype, P.device)
        with torch.no_grad():
            x_t = math.sqrt(a_t) * mu + math.sqrt(1 - a_t) * noise
            e = eps_model(x_t, torch.full((n,), t, dtype=torch.long, device=P.device))
        with torch.enable_grad():
            if obs_weight is None:
                obs = -operator.log_likelihood(mu, P.y, P.sigma_y)
            else:
                obs = obs_weight * ((P.y - operator.forward(mu)) ** 2).reshape(n, -1).sum(1) / 2
            lam_t = lam * math.sqrt((1 - a_t) / a_t)
            loss = obs.sum() + lam_t * ((e - noise).detach() * mu).sum()
            opt.zero_grad()
            loss.backward()
        opt.step()
    return mu.detach()
