r"""Gauss-Newton and Fisher curvature of a network's loss, per sample.

For outputs :math:`f_i = f(x_i; \theta)` with Jacobian :math:`J_i = \partial f_i/\partial\theta`
and the Hessian of the negative log-likelihood in the outputs :math:`\Lambda_i`,

.. math:: \mathrm{GGN} = \sum_i J_i^\top \Lambda_i J_i, \qquad
          \mathrm{EF} = \sum_i \nabla_\theta \log p(y_i \mid f_i)\, \nabla_\theta \log p(y_i \mid f_i)^\top .

Classification (softmax): :math:`\Lambda = \mathrm{diag}(p) - pp^\top = LL^\top` with
:math:`L = \mathrm{diag}(\sqrt p) - p\sqrt p^{\top}`. Regression (Gaussian, unit noise):
:math:`\Lambda = I`; divide by :math:`\sigma^2` for another noise level.

Parameters are a dict; a flat vector concatenates them row-major in dict order.
"""
from __future__ import annotations

import torch
from torch import nn

Params = dict[str, torch.Tensor]


def output_hessian_sqrt(likelihood: str, f: torch.Tensor) -> torch.Tensor:
    """``L`` with ``L Lᵀ = Λ`` for each row of outputs ``f`` ``(n, C)``: shape ``(n, C, C)``."""
    n, C = f.shape
    if likelihood == "regression":
        return torch.eye(C, dtype=f.dtype, device=f.device).expand(n, C, C)
    p = torch.softmax(f, -1)
    sp = p.sqrt()
    return torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)


def log_likelihood(likelihood: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed log-likelihood (regression with unit noise, up to the noise terms)."""
    if likelihood == "classification":
        return -nn.functional.cross_entropy(f, y, reduction="sum")
    return -0.5 * ((f - y.reshape(f.shape)) ** 2).sum()


def flatten(params: Params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vec: torch.Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, p in like.items():
        out[k] = vec[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def jacobians(fn, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians of ``fn(params, x_i) -> (C,)``: ``(n, C, P)``."""
    jac = torch.func.vmap(torch.func.jacrev(fn), in_dims=(None, 0))(params, x)
    return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)


def ggn_batch(fn, params: Params, x: torch.Tensor, likelihood: str, structure: str) -> torch.Tensor:
    """GGN of one batch: ``(P, P)`` for ``structure="full"``, ``(P,)`` for ``"diag"``."""
    J = jacobians(fn, params, x)
    f = torch.func.vmap(fn, in_dims=(None, 0))(params, x)
    LJ = torch.einsum("nck,ncp->nkp", output_hessian_sqrt(likelihood, f.detach()), J)
    if structure == "full":
        return torch.einsum("nkp,nkq->pq", LJ, LJ)
    return (LJ**2).sum((0, 1))


def ef_batch(fn, params: Params, x: torch.Tensor, y: torch.Tensor, likelihood: str, structure: str) -> torch.Tensor:
    """Empirical Fisher of one batch from per-sample log-likelihood gradients."""
    def ll(p, xi, yi):
        return log_likelihood(likelihood, fn(p, xi).unsqueeze(0), yi.unsqueeze(0))

    g = torch.func.vmap(torch.func.grad(ll), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1)
    return G.T @ G if structure == "full" else (G**2).sum(0)


def sample_labels(likelihood: str, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels drawn from the model's own predictive (softmax, or unit-noise Gaussian)."""
    if likelihood == "classification":
        return torch.multinomial(torch.softmax(f.detach(), -1), 1, generator=generator).squeeze(1)
    return f.detach() + torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=generator)


def mc_fisher_batch(fn, params: Params, x: torch.Tensor, likelihood: str, structure: str,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Monte Carlo GGN: the empirical Fisher at labels sampled from the model. For these
    likelihoods the Fisher equals the GGN, so this is an unbiased estimate of it at one
    per-sample gradient (instead of one per output)."""
    f = torch.func.vmap(fn, in_dims=(None, 0))(params, x)
    y = sample_labels(likelihood, f, generator)
    if likelihood == "regression":
        y = y.reshape(f.shape)
    return ef_batch(fn, params, x, y, likelihood, structure)
