r"""Analytic bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", §4.2, the analytic case): no data needed.

Quantizing a layer's weight, ``Ŵ = W + ε``, shifts the mean of its output by

.. math::  \mathbb E[\hat W x] - \mathbb E[W x] = \varepsilon\, \mathbb E[x],

so subtracting ``ε E[x]`` from the bias restores it. Where the layer reads a ``BatchNorm``
(optionally through a ReLU, ReLU6, Hardtanh or per-channel clip), its pre-activation is modelled
as ``N(β_c, γ_c²)`` per channel from the norm's affine parameters (the norm's output would be
exactly that for Gaussian inputs with the running statistics), and ``E[x_c]`` is closed form:
with ``m(μ, σ) = E[max(Y, 0)] = μ Φ(μ/σ) + σ φ(μ/σ)`` for ``Y ~ N(μ, σ²)``,

.. math::  \mathbb E[\mathrm{clamp}(Y, a, b)] = a + m(\mu - a, \sigma) - m(\mu - b, \sigma)

(ReLU: ``a = 0, b = ∞``, i.e. ``m(β, |γ|)``; ReLU6: ``a = 0, b = 6``; no activation: ``β``). For a
convolution ``ε`` is summed over the kernel's spatial positions (every tap reads the same
channel mean); zero padding, which makes border taps read 0 instead, is ignored, so the
correction is exact for the interior outputs only.

Use: :func:`expected_inputs` on the float model *before* batch-norm folding (the norms are read
through :func:`qbayes.transforms.graph.chains`), then fold, quantize, and
:func:`correct_bias_analytic` against the float model the weights were quantized from. A rewrite
that rescales a layer's input channels in between (cross-layer equalisation) changes ``E[x]``:
compute the expectations after it, or not at all. Not function-preserving by design.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import QBayesError
from ..nn import QuantConv2d, QuantLinear
from .bias_correction import _add_to_bias
from .graph import CLIPPED, LAYERS, ChannelClip, chains

QUANT_LAYERS = (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)


class ExpectedInputs(dict):
    """``{layer name: E[x] per input channel}`` (float64), with :attr:`skipped`: the model's
    linear/conv layers whose input is not a BatchNorm chain (no closed-form mean)."""

    def __init__(self, means: dict, skipped: list[str]):
        super().__init__(means)
        self.skipped = skipped


def relu_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[max(Y, 0)]`` for ``Y ~ N(mean, std²)``: ``μ Φ(μ/σ) + σ φ(μ/σ)`` (``max(μ, 0)`` where ``σ = 0``)."""
    mean, std = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64).abs()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    z = mean / safe
    m = mean * torch.special.ndtr(z) + safe * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return torch.where(std > 0, m, mean.clamp(min=0))


def clipped_mean(mean: torch.Tensor, std: torch.Tensor, lo=0.0, hi=math.inf) -> torch.Tensor:
    """``E[clamp(Y, lo, hi)]`` for ``Y ~ N(mean, std²)`` (``lo``/``hi`` scalars or per channel;
    ``lo = 0, hi = ∞`` is ReLU)."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    lo, hi = (torch.as_tensor(v, dtype=torch.float64).to(mean.device) for v in (lo, hi))
    open_top = torch.isinf(hi)
    top = torch.where(open_top, 0.0, relu_mean(mean - torch.where(open_top, 0.0, hi), std))
    return lo + relu_mean(mean - lo, std) - top


def _act_mean(act: nn.Module | None, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    if act is None:
        return beta
    if isinstance(act, nn.ReLU):
        return relu_mean(beta, gamma)
    if isinstance(act, ChannelClip):
        return clipped_mean(beta, gamma, act.lo.double().flatten(), act.hi.double().flatten())
    if isinstance(act, CLIPPED):  # nn.Hardtanh and its subclass nn.ReLU6
        return clipped_mean(beta, gamma, float(act.min_val), float(act.max_val))
    raise QBayesError(f"no closed-form mean for a {type(act).__name__} after a BatchNorm")  # pragma: no cover


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if hasattr(layer, "in_channels") else layer.in_features


def expected_inputs(model: nn.Module) -> ExpectedInputs:
    """``E[x]`` per input channel of every layer of the float ``model`` that reads a BatchNorm
    (through an optional ReLU / ReLU6 / Hardtanh / per-channel clip), from the norm's ``β`` and
    ``γ`` under the Gaussian model; call it before :func:`~qbayes.transforms.fold_batchnorm`.
    Raises if no layer of the model reads one."""
    means = {}
    for c in chains(model):
        if c.norm is None or c.consumer is None:
            continue
        bn, consumer = model.get_submodule(c.norm), model.get_submodule(c.consumer)
        if _in_channels(consumer) != bn.num_features:
            continue
        beta = bn.bias.detach().double() if bn.affine else torch.zeros(bn.num_features, dtype=torch.float64)
        gamma = bn.weight.detach().double() if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)
        act = model.get_submodule(c.act) if c.act is not None else None
        means[c.consumer] = _act_mean(act, beta, gamma.abs())
    skipped = [n for n, m in model.named_modules() if n and isinstance(m, LAYERS) and n not in means]
    if not means:
        raise QBayesError(f"no layer of this {type(model).__name__} reads a BatchNorm (optionally through a "
                          "ReLU/ReLU6) directly, so analytic bias correction has no input means; call "
                          "expected_inputs before fold_batchnorm, or use the empirical correct_bias with data")
    return ExpectedInputs(means, skipped)


def _dense(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, (QuantLinear, QuantConv2d)):
        return layer.dequantize(torch.float64)
    return layer.weight.detach().double()


def mean_shift(qlayer: nn.Module, layer: nn.Module, mean: torch.Tensor) -> torch.Tensor:
    """``ε E[x]`` per output channel (``ε`` = the quantized layer's dequantized weight minus the float
    one; a convolution's summed over its spatial taps, per group)."""
    qw = _dense(qlayer)
    eps = qw - _dense(layer).to(qw.device)
    mean = mean.double().to(eps.device)
    if eps.dim() == 2:
        return eps @ mean
    groups = qlayer.groups
    summed = eps.sum((2, 3)).view(groups, eps.shape[0] // groups, -1)   # (groups, out/groups, in/groups)
    return torch.einsum("goi,gi->go", summed, mean.view(groups, -1)).reshape(-1)


def correct_bias_analytic(model: nn.Module, reference: nn.Module, expected: dict[str, torch.Tensor]
                          ) -> dict[str, float]:
    """Subtract ``ε E[x]`` from the bias of every layer of ``expected`` in the quantized ``model``,
    in place, against the float ``reference`` (same module names; the weights it was quantized
    from). ``expected`` comes from :func:`expected_inputs`. Returns, per layer, the largest
    per-channel shift removed."""
    if not expected:
        raise QBayesError("correct_bias_analytic: no expected inputs given (see expected_inputs)")
    qmods, fmods = dict(model.named_modules()), dict(reference.named_modules())
    shifts = {}
    for name, mean in expected.items():
        q, f = qmods.get(name), fmods.get(name)
        if not isinstance(q, QUANT_LAYERS) or not isinstance(f, QUANT_LAYERS):
            raise QBayesError(f"{name!r} is not a linear/conv layer of both the quantized and the float model")
        qshape, fshape = tuple(_dense(q).shape), tuple(_dense(f).shape)
        if qshape != fshape:
            raise QBayesError(f"{name}: the quantized weight {qshape} does not match the float weight {fshape}")
        if mean.numel() != _in_channels(f):
            raise QBayesError(f"{name}: {mean.numel()} input means for a layer with {_in_channels(f)} input channels")
        delta = mean_shift(q, f, mean)
        _add_to_bias(q, -delta)
        shifts[name] = float(delta.abs().max())
    return shifts
