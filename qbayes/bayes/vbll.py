r"""Variational Bayesian Last Layers (Harrison, Willes & Snoek 2024).

A network's last layer gets a Gaussian variational posterior :math:`q(w_k) = N(\bar w_k, S)`
(one row per output, covariance :math:`S = LL^\top` shared across rows, prior
:math:`N(0, s^2 I)`), trained jointly with the features :math:`\phi(x)` on a deterministic
lower bound, so no sampling is needed in training:

* regression, :math:`y = w^\top\phi + \varepsilon,\ \varepsilon\sim N(0,\sigma^2)`:

  .. math:: \log p(y\mid x) \ge \log N(y \mid \bar w^\top\phi, \sigma^2) - \frac{\phi^\top S\phi}{2\sigma^2},

  with predictive :math:`N(\bar w^\top\phi,\ \phi^\top S\phi + \sigma^2)`. For fixed features
  and noise the bound is tight at the exact Bayesian linear-regression posterior.
* classification (the discriminative model), by Jensen's inequality:

  .. math:: \log p(y\mid x) \ge \bar w_y^\top\phi - \log\sum_k \exp(\bar w_k^\top\phi + \tfrac12\phi^\top S\phi),

  with predictive :math:`\mathbb E[\mathrm{softmax}(z)]`,
  :math:`z_k \sim N(\bar w_k^\top\phi,\ \phi^\top S\phi)` (Monte Carlo).

The loss is the negative bound averaged over the batch plus :math:`\mathrm{KL}(q\|p)/N`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class _VBLL(nn.Module):
    def __init__(self, in_features: int, out_features: int, prior_scale: float = 1.0, init_sd: float = 0.1):
        super().__init__()
        self.in_features, self.out_features, self.prior_scale = in_features, out_features, prior_scale
        self.W_mean = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.L_offdiag = nn.Parameter(torch.zeros(in_features, in_features))
        self.L_logdiag = nn.Parameter(torch.full((in_features,), math.log(init_sd)))

    @property
    def L(self) -> torch.Tensor:
        return torch.tril(self.L_offdiag, -1) + torch.diag(self.L_logdiag.exp())

    @property
    def S(self) -> torch.Tensor:
        L = self.L
        return L @ L.T

    def quad(self, phi: torch.Tensor) -> torch.Tensor:
        """``φᵀ S φ`` per row of ``phi``."""
        return ((phi @ self.L) ** 2).sum(-1)

    def kl(self) -> torch.Tensor:
        """``Σ_k KL(N(w̄_k, S) || N(0, s² I))``."""
        d, s2 = self.in_features, self.prior_scale**2
        logdet_S = 2 * self.L_logdiag.sum()
        trace_S = (self.L**2).sum()
        per_row = 0.5 * (trace_S / s2 - d + d * math.log(s2) - logdet_S)
        return self.out_features * per_row + 0.5 * (self.W_mean**2).sum() / s2


class VBLLRegression(_VBLL):
    """Regression head with a learned (point-estimate) noise level per output."""

    def __init__(self, in_features: int, out_features: int = 1, prior_scale: float = 1.0, init_sd: float = 0.1,
                 noise_std: float = 1.0, learn_noise: bool = True):
        super().__init__(in_features, out_features, prior_scale, init_sd)
        self.log_noise = nn.Parameter(torch.full((out_features,), math.log(noise_std)), requires_grad=learn_noise)

    def loss(self, phi: torch.Tensor, y: torch.Tensor, n_data: int) -> torch.Tensor:
        y = y.reshape(phi.shape[0], self.out_features)
        var = (2 * self.log_noise).exp()
        mean = phi @ self.W_mean.T
        ll = -0.5 * ((y - mean) ** 2 / var + torch.log(2 * math.pi * var)) - 0.5 * self.quad(phi)[:, None] / var
        return -ll.sum(1).mean() + self.kl() / n_data

    def predict(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive mean and variance of ``y``: ``(n, out)`` each."""
        return phi @ self.W_mean.T, self.quad(phi)[:, None] + (2 * self.log_noise).exp()


class VBLLClassification(_VBLL):
    def loss(self, phi: torch.Tensor, y: torch.Tensor, n_data: int) -> torch.Tensor:
        logits = phi @ self.W_mean.T
        bound = logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits + 0.5 * self.quad(phi)[:, None], 1)
        return -bound.mean() + self.kl() / n_data

    def predict(self, phi: torch.Tensor, n_samples: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class probabilities, Monte Carlo over the Gaussian logits."""
        mean = phi @ self.W_mean.T
        sd = self.quad(phi).clamp_min(0).sqrt()[:, None]
        z = torch.randn(n_samples, *mean.shape, dtype=mean.dtype, generator=generator)
        return F.softmax(mean + sd * z, -1).mean(0)


class VBLLNet(nn.Module):
    """``features`` followed by a VBLL head; ``loss(x, y, n_data)`` and ``predict(x)``."""

    def __init__(self, features: nn.Module, head: _VBLL):
        super().__init__()
        self.features, self.head = features, head

    def loss(self, x, y, n_data: int) -> torch.Tensor:
        return self.head.loss(self.features(x), y, n_data)

    def predict(self, x, **kw):
        return self.head.predict(self.features(x), **kw)
