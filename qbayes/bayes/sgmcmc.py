r"""Stochastic-gradient MCMC samplers, each ``build(log_posterior, ...) -> Transform``.

Notation: :math:`g = \nabla_\theta \log p(\theta \mid D)` estimated on a mini-batch, step
size :math:`\epsilon` (``lr``), temperature :math:`T`, :math:`\xi \sim N(0, I)`. Step sizes and
temperatures may be functions of the step (see :mod:`qbayes.bayes.schedules`).

* SGLD (Welling & Teh 2011): :math:`\theta \leftarrow \theta + \epsilon g + \sqrt{2\epsilon T}\,\xi`.
* pSGLD (Li et al. 2016), RMSprop preconditioner :math:`G = 1/(\lambda + \sqrt{V})`,
  :math:`V \leftarrow \beta V + (1-\beta) g^2`:
  :math:`\theta \leftarrow \theta + \epsilon G g + \sqrt{2\epsilon T G}\,\xi` (the small
  :math:`\Gamma` correction term is dropped, as in the paper's experiments; :math:`V` is
  bias-corrected as in Adam). Without :math:`\Gamma` the chain is only right when :math:`V`
  averages over many mixing times: take ``beta`` close to 1.
* SGHMC (Chen et al. 2014), friction :math:`\alpha`, gradient-noise estimate :math:`\beta`:
  :math:`m \leftarrow (1 - \epsilon\alpha) m + \epsilon g + \sqrt{\epsilon T (2\alpha - \epsilon\beta)}\,\xi`,
  :math:`\theta \leftarrow \theta + \epsilon m`.
* SA-SGLD (Rajpal, Leimkuhler & Jiang 2025, after the SamAdams time rescaling of Leimkuhler,
  Lohmann & Whalley 2025): SGLD in a rescaled time :math:`dt = \psi(\zeta)\,d\tau`, with
  :math:`\zeta` a moving average of the monitor :math:`\|g\|^2/d`,
  :math:`\zeta \leftarrow \rho\zeta + (1-\rho)\|g\|^2/d`, :math:`\rho = e^{-\alpha\epsilon}`, and
  :math:`\psi(\zeta) = m(\zeta^r + M)/(\zeta^r + m)` between ``m`` and ``M``: steps shrink where
  gradients are large and grow on plateaus. The chain's invariant law in :math:`\tau` is
  :math:`\pi/\psi`, so each sample carries the weight :math:`\psi(\zeta)` (``extras["weight"]``,
  used by :class:`~qbayes.bayes.trace.Trace`) to recover :math:`\pi`. This is our reading of the
  method; constants follow its description, not its code.
* Entropy-MCMC (Li & Zhang 2023): joint SGLD on :math:`(\theta, \theta_a)` targeting
  :math:`p(\theta \mid D)\exp(-\|\theta - \theta_a\|^2 / (2\eta))`. The marginal of
  :math:`\theta` is the posterior; that of the guiding variable :math:`\theta_a`
  (``extras["guide"]``) is the posterior smoothed by :math:`N(0, \eta I)` (local entropy), which
  pulls the chain toward flat basins.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .base import LogPosterior, Params, State, Transform, commit, scheduled, value_and_grad
from ..errors import QBayesError

Hyper = float | Callable[[int], float]


def _init(params: Params, **extras) -> State:
    return State(params={k: v.detach().clone() for k, v in params.items()},
                 log_posterior=torch.tensor(float("nan")), extras=extras)


def _noise(p: torch.Tensor, var) -> torch.Tensor:
    if isinstance(var, torch.Tensor):
        return torch.randn_like(p) * var.sqrt()
    return torch.randn_like(p) * math.sqrt(var) if var > 0 else torch.zeros_like(p)


def sgld(log_posterior: LogPosterior, lr: Hyper, temperature: Hyper = 1.0) -> Transform:
    """Stochastic gradient Langevin dynamics."""

    def update(state: State, batch, inplace: bool = False) -> State:
        eps, T = scheduled(lr, state.step), scheduled(temperature, state.step)
        value, g, aux = value_and_grad(log_posterior, state.params, batch)
        new = {k: p + eps * g[k] + _noise(p, 2 * eps * T) for k, p in state.params.items()}
        return commit(state, inplace, new, log_posterior=value, step=state.step + 1, aux=aux)

    return Transform(_init, update)


def psgld(log_posterior: LogPosterior, lr: Hyper, beta: float = 0.99, eps: float = 1e-5,
          temperature: Hyper = 1.0) -> Transform:
    """Preconditioned SGLD with an RMSprop diagonal metric."""

    def init(params: Params) -> State:
        return _init(params, v={k: torch.zeros_like(p) for k, p in params.items()})

    def update(state: State, batch, inplace: bool = False) -> State:
        e, T = scheduled(lr, state.step), scheduled(temperature, state.step)
        value, g, aux = value_and_grad(log_posterior, state.params, batch)
        v = {k: beta * state.extras["v"][k] + (1 - beta) * g[k] ** 2 for k in g}
        correction = 1 - beta ** (state.step + 1)  # Adam's bias correction: no inflated early steps
        G = {k: 1.0 / (eps + (v[k] / correction).sqrt()) for k in g}
        new = {k: p + e * G[k] * g[k] + _noise(p, 2 * e * T * G[k]) for k, p in state.params.items()}
        return commit(state, inplace, new, log_posterior=value, step=state.step + 1, aux=aux, extras={"v": v})

    return Transform(init, update)


def sghmc(log_posterior: LogPosterior, lr: Hyper, alpha: Hyper = 0.01, beta: float = 0.0,
          temperature: Hyper = 1.0) -> Transform:
    """Stochastic gradient Hamiltonian Monte Carlo (unit mass, friction ``alpha``).

    See :func:`sgd_equivalent` to set ``lr`` and ``alpha`` from an SGD learning rate and momentum.
    """

    def init(params: Params, momenta: Params | None = None) -> State:
        m = momenta if momenta is not None else {k: torch.zeros_like(p) for k, p in params.items()}
        return _init(params, momenta={k: v.detach().clone() for k, v in m.items()})

    def update(state: State, batch, inplace: bool = False) -> State:
        e, T, a = scheduled(lr, state.step), scheduled(temperature, state.step), scheduled(alpha, state.step)
        value, g, aux = value_and_grad(log_posterior, state.params, batch)
        var = max(e * T * (2 * a - e * beta), 0.0)
        m = {k: (1 - e * a) * state.extras["momenta"][k] + e * g[k] + _noise(g[k], var) for k in g}
        new = {k: p + e * m[k] for k, p in state.params.items()}
        return commit(state, inplace, new, log_posterior=value, step=state.step + 1, aux=aux,
                      extras={"momenta": m})

    return Transform(init, update)


def sasgld(log_posterior: LogPosterior, lr: float, alpha: float = 1.0, m: float = 0.1, M: float = 10.0,
           r: float = 0.5, temperature: Hyper = 1.0) -> Transform:
    """SGLD with SamAdams-style adaptive (time-rescaled) step sizes; samples carry weights."""
    if not 0 < m < M:
        raise QBayesError("SA-SGLD needs 0 < m < M (bounds of the step-size factor)")

    def psi(zeta: float) -> float:
        z = zeta**r
        return m * (z + M) / (z + m)

    def init(params: Params) -> State:
        return _init(params, zeta=None, weight=1.0)

    def update(state: State, batch, inplace: bool = False) -> State:
        T = scheduled(temperature, state.step)
        value, g, aux = value_and_grad(log_posterior, state.params, batch)
        monitor = float(sum((v**2).sum() for v in g.values()) / sum(v.numel() for v in g.values()))
        zeta = state.extras["zeta"]
        rho = math.exp(-alpha * lr)
        zeta = monitor if zeta is None else rho * zeta + (1 - rho) * monitor
        w = psi(zeta)
        dt = w * lr
        new = {k: p + dt * g[k] + _noise(p, 2 * dt * T) for k, p in state.params.items()}
        return commit(state, inplace, new, log_posterior=value, step=state.step + 1, aux=aux,
                      extras={"zeta": zeta, "weight": w})

    return Transform(init, update)


def entropy_mcmc(log_posterior: LogPosterior, lr: Hyper, eta: float = 1.0, temperature: Hyper = 1.0) -> Transform:
    """Entropy-MCMC: SGLD on the parameters and a guiding variable coupled by ``||θ-θa||²/(2η)``."""

    def init(params: Params, guide: Params | None = None) -> State:
        a = guide if guide is not None else params
        return _init(params, guide={k: v.detach().clone() for k, v in a.items()})

    def update(state: State, batch, inplace: bool = False) -> State:
        e, T = scheduled(lr, state.step), scheduled(temperature, state.step)
        value, g, aux = value_and_grad(log_posterior, state.params, batch)
        a = state.extras["guide"]
        new = {k: p + e * (g[k] - (p - a[k]) / eta) + _noise(p, 2 * e * T) for k, p in state.params.items()}
        guide = {k: a[k] + e * (p - a[k]) / eta + _noise(p, 2 * e * T) for k, p in state.params.items()}
        return commit(state, inplace, new, log_posterior=value, step=state.step + 1, aux=aux,
                      extras={"guide": guide})

    return Transform(init, update)


def sgd_equivalent(lr: Hyper, momentum: float, num_data: int) -> tuple[Callable[[int], float], Callable[[int], float]]:
    r"""SGHMC ``(lr, alpha)`` schedules equivalent to SGD with momentum on the *mean* loss.

    With :math:`\eta = \epsilon^2` the SGHMC update is heavy-ball SGD on the summed log
    posterior with step :math:`\eta` and momentum :math:`1 - \epsilon\alpha` (Chen et al. 2014,
    Sec. 4). SGD on the mean loss with learning rate ``lr`` is step ``lr/N`` on the sum, so
    :math:`\epsilon = \sqrt{lr/N}` and :math:`\alpha = (1 - momentum)/\epsilon`.
    """
    eps = lambda t: math.sqrt(scheduled(lr, t) / num_data)
    return eps, (lambda t: (1 - momentum) / max(eps(t), 1e-12))
