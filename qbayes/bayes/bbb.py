r"""Bayes by Backprop (Blundell et al. 2015) with the local reparameterisation trick
(Kingma, Salimans & Welling 2015) for linear and convolutional layers.

Each weight has a factorised Gaussian posterior :math:`N(\mu, \sigma^2)`,
:math:`\sigma = \mathrm{softplus}(\rho)`, and prior :math:`N(0, s^2)`. Instead of sampling
weights, a layer samples its pre-activations, which are Gaussian given the input:

.. math:: b \sim N\big(x\mu^\top,\ x^2 (\sigma^2)^\top\big)

(for a convolution, the mean and variance are convolutions with :math:`\mu` and
:math:`\sigma^2`), so every example in a batch gets independent noise and the gradient variance
drops. Training minimises :math:`\frac{1}{N}\mathrm{KL}(q\|p) - \frac1B\sum_i \log p(y_i\mid x_i)`.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import QBayesError


class _MeanField(nn.Module):
    """Shared parameters and KL of a mean-field layer; subclasses define ``_mean_var``."""

    sample = True  # class default; `set_sampling` overrides per instance

    def _init_params(self, weight: torch.Tensor, bias: torch.Tensor | None, prior_std: float, init_sd: float):
        rho = math.log(math.expm1(init_sd))
        self.weight_mu = nn.Parameter(weight.detach().clone())
        self.weight_rho = nn.Parameter(torch.full_like(weight, rho))
        if bias is not None:
            self.bias_mu = nn.Parameter(bias.detach().clone())
            self.bias_rho = nn.Parameter(torch.full_like(bias, rho))
        else:
            self.bias_mu = self.bias_rho = None
        self.prior_std = prior_std

    def _sd(self, rho):
        return F.softplus(rho)

    def kl(self) -> torch.Tensor:
        """``KL(q || N(0, s²))`` summed over the layer's weights (closed form)."""
        s2 = self.prior_std**2
        total = 0.0
        for mu, rho in ((self.weight_mu, self.weight_rho), (self.bias_mu, self.bias_rho)):
            if mu is None:
                continue
            sd = self._sd(rho)
            total = total + (math.log(self.prior_std) - torch.log(sd) + (sd**2 + mu**2) / (2 * s2) - 0.5).sum()
        return total

    def forward(self, x):
        mean, var = self._mean_var(x)
        if not self.sample:
            return mean
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)


class MeanFieldLinear(_MeanField):
    def __init__(self, layer: nn.Linear, prior_std: float = 1.0, init_sd: float = 1e-3):
        super().__init__()
        self._init_params(layer.weight, layer.bias, prior_std, init_sd)

    def _mean_var(self, x):
        mean = F.linear(x, self.weight_mu, self.bias_mu)
        var = F.linear(x * x, self._sd(self.weight_rho) ** 2,
                       None if self.bias_rho is None else self._sd(self.bias_rho) ** 2)
        return mean, var


class MeanFieldConv2d(_MeanField):
    def __init__(self, layer: nn.Conv2d, prior_std: float = 1.0, init_sd: float = 1e-3):
        super().__init__()
        self._init_params(layer.weight, layer.bias, prior_std, init_sd)
        self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        if layer.padding_mode != "zeros":
            raise QBayesError("mean-field convolutions support zero padding only")

    def _mean_var(self, x):
        mean = F.conv2d(x, self.weight_mu, self.bias_mu, **self.conv)
        var = F.conv2d(x * x, self._sd(self.weight_rho) ** 2,
                       None if self.bias_rho is None else self._sd(self.bias_rho) ** 2, **self.conv)
        return mean, var


def to_mean_field(model: nn.Module, prior_std: float = 1.0, init_sd: float = 1e-3) -> nn.Module:
    """A copy of ``model`` whose Linear/Conv2d layers are mean-field layers centred on its weights."""
    new = copy.deepcopy(model)
    for name, mod in list(new.named_modules()):
        repl = None
        if isinstance(mod, nn.Linear):
            repl = MeanFieldLinear(mod, prior_std, init_sd)
        elif isinstance(mod, nn.Conv2d):
            repl = MeanFieldConv2d(mod, prior_std, init_sd)
        if repl is not None:
            parent, _, attr = name.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, attr, repl)
    if not any(isinstance(m, _MeanField) for m in new.modules()):
        raise QBayesError("the model has no Linear or Conv2d layer to make Bayesian")
    return new


def kl_divergence(model: nn.Module) -> torch.Tensor:
    return sum(m.kl() for m in model.modules() if isinstance(m, _MeanField))


def set_sampling(model: nn.Module, on: bool) -> None:
    """Sample pre-activations (``True``) or use the posterior means (``False``)."""
    for m in model.modules():
        if isinstance(m, _MeanField):
            m.sample = on


def elbo_loss(model: nn.Module, x, y, n_data: int, likelihood: str = "classification",
              noise_std: float | torch.Tensor = 1.0, kl_weight: float = 1.0) -> torch.Tensor:
    """Negative ELBO per training example: mean NLL of the batch plus ``KL / n_data``."""
    out = model(x)
    if likelihood == "classification":
        nll = F.cross_entropy(out, y)
    else:
        var = torch.as_tensor(noise_std, dtype=out.dtype) ** 2
        nll = 0.5 * ((out.reshape(y.shape) - y) ** 2 / var + torch.log(2 * math.pi * var)).mean()
    return nll + kl_weight * kl_divergence(model) / n_data


@torch.no_grad()
def mc_predict(model: nn.Module, x: torch.Tensor, n_samples: int = 32) -> torch.Tensor:
    """Class probabilities averaged over ``n_samples`` stochastic forward passes."""
    set_sampling(model, True)
    return torch.stack([torch.softmax(model(x), -1) for _ in range(n_samples)]).mean(0)
