r"""Gaussian variational inference over a parameter dict, functional style.

Maximises the evidence lower bound with reparameterised samples
:math:`\theta = \mu + A\epsilon` (Blundell et al. 2015; Kingma & Welling 2014):

.. math:: \mathcal L(q) = \mathbb E_q[\log p(\theta, D)] + \mathbb H[q] .

* mean-field (``diag``): :math:`q = N(\mu, \mathrm{diag}\,\sigma^2)`, :math:`\sigma = e^{s}`;
  :math:`\mathbb H = \sum \log\sigma + \text{const}`.
* low-rank plus diagonal (``lowrank``): :math:`q = N(\mu, \mathrm{diag}(d^2) + VV^\top)` with
  :math:`V \in \mathbb R^{P\times r}`, sampled as :math:`\mu + d\odot\epsilon_1 + V\epsilon_2`;
  :math:`\log\det` by the matrix determinant lemma,
  :math:`\log\det D + \log\det(I_r + V^\top D^{-1} V)` (Ong, Nott & Smith 2018).

``log_posterior(params, batch) -> (value, aux)`` as for every method here (mini-batch
estimates scaled to the full data set); the variational parameters are updated by a
functional Adam step whose learning rate may be a function of the step (decay it to let the
stochastic optimisation settle). ``state.params`` holds the mean.
"""
from __future__ import annotations


import torch

from ..curvature import flatten, unflatten
from .base import LogPosterior, Params, State, Transform, commit, scheduled
from .optim import adam_init, adam_step


def _expected_log_post(log_posterior, batch, n_samples, sample_fn):
    def objective(var):
        total = 0.0
        for _ in range(n_samples):
            theta, entropy = sample_fn(var)
            value, _ = log_posterior(theta, batch)
            total = total + value
        return -(total / n_samples + entropy)
    return objective


def diag(log_posterior: LogPosterior, lr=1e-2, n_samples: int = 1, init_log_sd: float = -3.0) -> Transform:
    """Mean-field Gaussian VI (variational parameters: ``mean``, ``log_sd``)."""

    def init(params: Params) -> State:
        var = {"mean": {k: v.detach().clone() for k, v in params.items()},
               "log_sd": {k: torch.full_like(v, init_log_sd) for k, v in params.items()}}
        flat = _flat(var)
        return State(params=var["mean"], log_posterior=torch.tensor(float("nan")),
                     extras={"var": var, "adam": adam_init(flat)})

    def sample_fn(var):
        theta = {k: var["mean"][k] + var["log_sd"][k].exp() * torch.randn_like(var["mean"][k]) for k in var["mean"]}
        return theta, sum(s.sum() for s in var["log_sd"].values())

    def update(state: State, batch, inplace: bool = False) -> State:
        var = state.extras["var"]
        flat = _flat(var)
        obj = _expected_log_post(log_posterior, batch, n_samples, sample_fn)
        loss, grads = _loss_and_grad(lambda f: obj(_unflat(f, var)), flat)
        flat, adam = adam_step(flat, grads, state.extras["adam"], state.step, scheduled(lr, state.step))
        new = _unflat(flat, var)
        return commit(state, inplace, new["mean"], log_posterior=-loss, step=state.step + 1,
                      extras={"var": new, "adam": adam})

    return Transform(init, update)


def lowrank(log_posterior: LogPosterior, rank: int = 2, lr=1e-2, n_samples: int = 1,
            init_log_sd: float = -3.0, init_factor_sd: float = 1e-3, seed: int = 0) -> Transform:
    """Low-rank-plus-diagonal Gaussian VI (variational parameters: ``mean``, ``log_d``, ``V``)."""

    def init(params: Params) -> State:
        mean = flatten({k: v.detach() for k, v in params.items()})
        g = torch.Generator().manual_seed(seed)
        var = {"mean": mean.clone(), "log_d": torch.full_like(mean, init_log_sd),
               "V": torch.randn(mean.numel(), rank, generator=g, dtype=mean.dtype) * init_factor_sd}
        like = {k: v.detach() for k, v in params.items()}
        return State(params=unflatten(mean.clone(), like), log_posterior=torch.tensor(float("nan")),
                     extras={"var": var, "adam": adam_init(var), "like": like})

    def update(state: State, batch, inplace: bool = False) -> State:
        var, like = state.extras["var"], state.extras["like"]

        def sample_fn(v):
            d = v["log_d"].exp()
            theta = v["mean"] + d * torch.randn_like(d) + v["V"] @ torch.randn(rank, dtype=d.dtype)
            return unflatten(theta, like), 0.5 * lowrank_logdet(d, v["V"])

        obj = _expected_log_post(log_posterior, batch, n_samples, sample_fn)
        loss, grads = _loss_and_grad(obj, var)
        new, adam = adam_step(var, grads, state.extras["adam"], state.step, scheduled(lr, state.step))
        return commit(state, inplace, unflatten(new["mean"].clone(), like), log_posterior=-loss,
                      step=state.step + 1, extras={"var": new, "adam": adam, "like": like})

    return Transform(init, update)


def lowrank_logdet(d: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``log det(diag(d²) + V Vᵀ)`` by the matrix determinant lemma."""
    inner = torch.eye(V.shape[1], dtype=V.dtype) + (V / d[:, None] ** 2).T @ V
    return 2 * torch.log(d).sum() + torch.logdet(inner)


def covariance(state: State) -> torch.Tensor:
    """Dense covariance of the variational posterior (flattened parameters; small models)."""
    var = state.extras["var"]
    if "V" in var:
        return torch.diag(var["log_d"].exp() ** 2) + var["V"] @ var["V"].T
    return torch.diag(flatten({k: v.exp() ** 2 for k, v in var["log_sd"].items()}))


def _flat(var):
    return {f"{group}/{k}": v for group, d in var.items() for k, v in d.items()}


def _unflat(flat, like):
    return {group: {k: flat[f"{group}/{k}"] for k in d} for group, d in like.items()}


def _loss_and_grad(fn, x):
    grads, loss = torch.func.grad_and_value(fn)(x)
    return loss.detach(), grads


__all__ = ["diag", "lowrank", "lowrank_logdet", "covariance"]
