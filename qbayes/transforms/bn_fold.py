r"""Batch-norm folding: a ``BatchNorm`` in eval mode after a conv or linear layer is an affine map
per output channel, merged into the layer:

.. math::  W' = W \cdot \frac{\gamma}{\sigma}, \qquad b' = (b - \mu)\,\frac{\gamma}{\sigma} + \beta,
           \qquad \sigma = \sqrt{\mathrm{var} + \epsilon},

and the norm becomes an ``Identity``. Exact up to float rounding (the model must be in eval mode:
training-mode batch statistics are not a fixed function).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import QBayesError
from ..nn import set_module
from .graph import chains


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every ``BatchNorm`` that directly follows a conv/linear layer into it, in place; return
    the folded norms' names."""
    if model.training:
        raise QBayesError("fold_batchnorm needs the model in eval mode (model.eval()): a training-mode batch "
                          "norm uses batch statistics, which no folded weight reproduces")
    folded = []
    with torch.no_grad():
        for c in chains(model):
            if c.norm is None:
                continue
            layer, bn = model.get_submodule(c.producer), model.get_submodule(c.norm)
            if bn.running_mean is None or bn.running_var is None:
                raise QBayesError(f"{c.norm} keeps no running statistics (track_running_stats=False): cannot fold it")
            if layer.weight.shape[0] != bn.num_features:
                raise QBayesError(f"{c.norm} has {bn.num_features} features but {c.producer} gives {layer.weight.shape[0]}")
            sigma = torch.sqrt(bn.running_var.double() + bn.eps)
            gamma = bn.weight.double() if bn.affine else torch.ones_like(sigma)
            beta = bn.bias.double() if bn.affine else torch.zeros_like(sigma)
            k = gamma / sigma
            w = layer.weight.double() * k.view(-1, *([1] * (layer.weight.dim() - 1)))
            b = layer.bias.double() if layer.bias is not None else torch.zeros_like(k)
            b = (b - bn.running_mean.double()) * k + beta
            layer.weight.copy_(w.to(layer.weight.dtype))
            if layer.bias is None:
                layer.bias = nn.Parameter(b.to(layer.weight.dtype))
            else:
                layer.bias.copy_(b.to(layer.bias.dtype))
            set_module(model, c.norm, nn.Identity())
            folded.append(c.norm)
    return folded
