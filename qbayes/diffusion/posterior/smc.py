r"""Sequential Monte Carlo posterior sampling: the twisted diffusion sampler, TDS (Wu, Trippe,
Naesseth, Blei & Cunningham 2023, "Practical and Asymptotically Exact Conditional Sampling in
Diffusion Models", NeurIPS).

Target: the diffusion model's own chain :math:`p_θ(x_{t_0:t_L}) = N(x_{t_0}; 0, I)\prod_i
p_θ(x_{t_{i+1}} \mid x_{t_i})` (DDIM(η) kernels on the grid of ``steps`` timesteps, Gaussian with
mean :math:`m_i(x) = \sqrt{ᾱ_s}x̂_0 + \sqrt{1-ᾱ_s-σ_i^2}ε̂` and variance :math:`σ_i^2`), reweighted
by the exact likelihood of the clean estimate at the last level, :math:`p(y \mid x̂_0(x_{t_L}))`.
With twisting functions :math:`\tilde p_i(y \mid x)` the particles move by the twisted proposal
and carry the weights

.. math:: x' \sim q_i = N\bigl(m_i(x) + σ_i^2 ∇_x \log\tilde p_i(y \mid x),\ σ_i^2 I\bigr),\qquad
          w \mathrel{*}= \frac{p_θ(x' \mid x)\,\tilde p_{i+1}(y \mid x')}{q_i(x' \mid x)\,\tilde p_i(y \mid x)},

starting from :math:`w = \tilde p_0(y \mid x_{t_0})` and ending with
:math:`w \mathrel{*}= p(y \mid x̂_0(x_{t_L})) / \tilde p_L(y \mid x_{t_L})`; the output is
:math:`x̂_0(x_{t_L})` (the last move, to ``ᾱ = 1``, is deterministic). Whatever the twist, the
weighted particles are consistent as ``particles → ∞`` for the posterior of the model's prior
(asymptotically exact); the twist only sets the variance. ``twist="pigdm"`` (default, linear
operators) is ΠGDM's :math:`N(y; A x̂_0, r_t^2 A A^T + σ_y^2 I)` (see :mod:`.pigdm`), which stays
smooth at high noise; ``twist="dps"`` is the paper's :math:`p(y \mid x̂_0(x))` (any operator, e.g.
:class:`Sign`). Gradients are autograd through ``eps_model``. Resampling (``"systematic"`` or
``"multinomial"``) happens when the effective sample size
:math:`(\sum w)^2/\sum w^2` falls below ``ess_threshold · particles``.

The twist decides how many particles are needed. ΠGDM's ``r_t²`` assumes data ``N(0, v I)``
with ``v = data_var``: give the data's per-coordinate variance. With ``v`` far below it the twist is
much too sharp at high noise, pulls the particles onto the wrong modes and the weights cannot
repair it with any affordable number of particles (still exact as ``particles → ∞``; on the
25-mode mixture of ``bench/inverse_gmm.py`` ``v = 1`` was badly off even at 8192 particles, the
mixture's ``v = 129`` right at 16). The ``"dps"`` twist is only usable when the step variance
``σ_i²`` is small next to ``σ_y²`` (many steps or a noisy ``y``): otherwise its guidance overshoots.

Exact up to the prior the chain samples: with an exact denoiser (:meth:`GaussianMixture.eps_model
<qbayes.diffusion.gmm.GaussianMixture.eps_model>`) the gap to the true posterior is the
discretisation of ``steps`` timesteps, which shrinks as ``steps → T``.

``n`` posterior samples come from ``n`` independent SMC runs of ``particles`` particles each
(``n · particles`` particles in all, processed ``batch_size`` particles at a time); each run
returns one particle drawn by its final weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...errors import QBayesError
from ..schedule import EpsModel, Schedule
from .common import check_eta, check_positive, ddim_coefficients, levels, pigdm_r2, pigdm_vector, problem, randn, tweedie


@dataclass
class SMCResult:
    """``samples`` ``(n, *shape)``; ``ess`` ``(steps + 1, n)`` each run's effective sample size
    (in particles) after each reweighting, before any resampling (the last row after the final
    likelihood correction); ``resampled`` ``(steps, n)`` whether each run resampled before each
    move; ``particles`` per run."""

    samples: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    particles: int


def smc(eps_model: EpsModel, schedule: Schedule, operator, y, sigma_y: float, n: int, steps: int = 100,
        generator: torch.Generator | None = None, progress: bool = False, *, particles: int = 64,
        twist: str = "pigdm", ess_threshold: float = 0.5, resampling: str = "systematic", eta: float = 1.0,
        data_var: float = 1.0, batch_size: int = 65536, shape: tuple | None = None,
        dtype: torch.dtype = torch.float64, device=None) -> SMCResult:
    """``n`` TDS posterior samples (module docstring); ``sigma_y > 0`` is required."""
    P = problem(schedule, operator, y, sigma_y, n, steps, shape, dtype, device, noiseless_ok=False)
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise QBayesError(f"particles must be a positive int, got {particles!r}")
    if twist not in ("pigdm", "dps") or (twist == "pigdm" and not operator.linear):
        raise QBayesError(f"twist must be 'pigdm' (linear operators) or 'dps', got {twist!r} for {type(operator).__name__}")
    if resampling not in ("systematic", "multinomial"):
        raise QBayesError(f"resampling must be 'systematic' or 'multinomial', got {resampling!r}")
    if not 0 <= ess_threshold <= 1:
        raise QBayesError(f"ess_threshold must be in [0, 1], got {ess_threshold!r}")
    eta, v = check_eta(eta, positive=True), check_positive(data_var, "data_var")
    runs = max(1, int(batch_size) // particles)
    out = [_chunk(eps_model, schedule, P, min(runs, n - i), particles, twist, ess_threshold, resampling, eta, v,
                  generator, progress and i == 0) for i in range(0, n, runs)]
    return SMCResult(torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out], 1),
                     torch.cat([o[2] for o in out], 1), particles)


def _chunk(eps_model, schedule, P, R, N, twist, threshold, resampling, eta, v, generator, progress):
    op, y, s2 = P.operator, P.y, P.sigma_y
    shape = P.shape

    def evaluate(x, t, a_t):
        """ε̂, x̂_0, log twist (R, N) and its gradient in x, at the particles x."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            eps, x0 = tweedie(eps_model, x, t, a_t)
            if twist == "pigdm":
                u, quad = pigdm_vector(op, x0, y, s2, pigdm_r2(a_t, v))
                g = torch.autograd.grad(x0, x, op.adjoint(u))[0]
                logtw = -0.5 * quad
            else:
                logtw = op.log_likelihood(x0, y, s2)
                g = torch.autograd.grad(logtw.sum(), x)[0]
        return eps.detach(), x0.detach(), logtw.detach().to('cpu', torch.float64).view(R, N), g.detach()

    ts = P.timesteps
    x = randn((R * N, *shape), generator, P.dtype, P.device)
    a0, _ = levels(schedule, ts[0], P.stride)
    eps, x0, logtw, g = evaluate(x, ts[0], a0)
    logw = logtw.clone()
    ess_hist, res_hist = [], []
    for i, t in enumerate(tqdm(ts, desc="SMC (TDS)", unit="step", disable=not progress)):
        a_t, a_s = levels(schedule, t, P.stride)
        ess = _ess(logw)
        ess_hist.append(ess)
        need = ess < threshold * N
        res_hist.append(need)
        if bool(need.any()):
            idx = _resample(logw, need, resampling, generator)
            flat = (idx + torch.arange(R).unsqueeze(1) * N).flatten()  # run r's particles: rows r·N … r·N + N − 1
            fd = flat.to(P.device)
            x, eps, x0, g = x[fd], eps[fd], x0[fd], g[fd]
            logtw = logtw.flatten()[flat].view(R, N)
            logw = torch.where(need.unsqueeze(1), torch.zeros_like(logw), logw)
        if t - P.stride < 0:  # the last level: the deterministic move to x̂_0 and the exact likelihood
            lik = op.log_likelihood(x0, y, s2).to('cpu', torch.float64).view(R, N)
            logw = logw + lik - logtw
            break
        c0, ce, sd = ddim_coefficients(a_t, a_s, eta)
        mean = c0 * x0 + ce * eps
        shift = sd * sd * g
        z = randn(x.shape, generator, P.dtype, P.device)
        x_new = mean + shift + sd * z
        # log p_θ(x'|x) − log q(x'|x) = (‖x' − m − σ²g‖² − ‖x' − m‖²) / (2σ²) with x' − m − σ²g = σ z
        dlog = ((sd * z) ** 2 - (sd * z + shift) ** 2).reshape(R * N, -1).sum(1) / (2 * sd * sd)
        eps, x0, logtw_new, g = evaluate(x_new, t - P.stride, a_s)
        logw = logw + dlog.to('cpu', torch.float64).view(R, N) + logtw_new - logtw
        x, logtw = x_new, logtw_new
    ess_hist.append(_ess(logw))
    pick = torch.multinomial(torch.softmax(logw, 1), 1, generator=_cpu(generator)).flatten()
    samples = x0.view(R, N, *shape)[torch.arange(R), pick.to(P.device)]
    return samples, torch.stack(ess_hist), torch.stack(res_hist)


def _ess(logw: torch.Tensor) -> torch.Tensor:
    return torch.exp(2 * torch.logsumexp(logw, 1) - torch.logsumexp(2 * logw, 1))


def _resample(logw: torch.Tensor, need: torch.Tensor, kind: str, generator) -> torch.Tensor:
    """Ancestor indices ``(R, N)``: resampled rows where ``need``, the identity elsewhere."""
    R, N = logw.shape
    w = torch.softmax(logw, 1)
    g = _cpu(generator)
    if kind == "multinomial":
        idx = torch.multinomial(w, N, replacement=True, generator=g)
    else:
        u = (torch.rand(R, 1, generator=g, dtype=torch.float64) + torch.arange(N, dtype=torch.float64)) / N
        cdf = torch.cumsum(w, 1)
        cdf[:, -1] = 1.0
        idx = torch.searchsorted(cdf, u).clamp(max=N - 1)
    return torch.where(need.unsqueeze(1), idx, torch.arange(N).expand(R, N))


def _cpu(generator):
    """The weights live on the CPU in float64; a generator elsewhere is not used for them."""
    return generator if generator is None or generator.device.type == "cpu" else None

