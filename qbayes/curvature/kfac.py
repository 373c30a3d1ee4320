r"""Kronecker-factored curvature (K-FAC, Martens & Grosse 2015) of ``nn.Linear`` layers.

For a linear layer with (bias-augmented) input :math:`a` and output gradients
:math:`g_c = L_c^\top \partial f/\partial y` for the columns of :math:`L` (:math:`\Lambda = LL^\top`),
the layer block of the GGN is approximated by

.. math:: \sum_i \sum_c (g_{ic} g_{ic}^\top) \otimes (a_i a_i^\top) \approx N\,\bar G \otimes \bar A,
          \quad \bar A = \frac1N\sum_i a_i a_i^\top,\ \ \bar G = \frac1N \sum_i\sum_c g_{ic}g_{ic}^\top,

for a weight ``W̃ = [W | b]`` of shape ``(out, in+1)`` flattened row-major. :math:`\bar A` is the
same layer-input second moment the GPTQ solver uses (:class:`InputSecondMoment`, whose ``H`` is
:math:`2\bar A`). With ``fisher="ef"`` the output gradients are those of the log-likelihood of
the observed labels (one per sample).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .ggn import output_hessian_sqrt
from .input_stats import InputSecondMoment


@dataclass
class KronFactors:
    A: torch.Tensor  # (in+1, in+1) mean input second moment (bias-augmented if the layer has a bias)
    G: torch.Tensor  # (out, out) mean summed output-gradient second moment
    n: int
    bias: bool


def kfac_factors(model: nn.Module, layers: dict[str, nn.Linear], loader, likelihood: str,
                 fisher: str = "ggn") -> dict[str, KronFactors]:
    """Accumulate K-FAC factors of ``layers`` over the batches ``(x, y)`` of ``loader``."""
    for name, m in layers.items():
        if not isinstance(m, nn.Linear):
            raise ValueError(f"K-FAC supports nn.Linear layers; {name} is a {type(m).__name__} (use structure='diag')")
    A = {n: InputSecondMoment(m.in_features + (m.bias is not None), dtype=torch.float64) for n, m in layers.items()}
    G = {n: InputSecondMoment(m.out_features, dtype=torch.float64) for n, m in layers.items()}
    inputs, outputs = {}, {}
    hooks = []
    for n, m in layers.items():
        def fwd(mod, a, out, n=n):
            inputs[n] = a[0].detach()
            outputs[n] = out
        hooks.append(m.register_forward_hook(fwd))
    total = 0
    try:
        for x, y in loader:
            f = model(x)
            for n, m in layers.items():
                a = inputs[n].reshape(-1, m.in_features).double()
                if m.bias is not None:
                    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
                A[n].update(a)
            outs = [outputs[n] for n in layers]
            if fisher == "ef":
                vecs = [torch.autograd.grad(-_nll(likelihood, f, y), f, retain_graph=True)[0]]
            else:
                L = output_hessian_sqrt(likelihood, f.detach())
                vecs = [L[:, :, c] for c in range(L.shape[2])]
            for c, v in enumerate(vecs):
                grads = torch.autograd.grad(f, outs, grad_outputs=v, retain_graph=c < len(vecs) - 1)
                for n, g in zip(layers, grads):
                    G[n].update(g.reshape(-1, g.shape[-1]).double())
            total += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
    per_sample = 1 if fisher == "ef" else f.shape[1]  # G stat averaged over n*per_sample rows
    return {n: KronFactors(A=A[n].H / 2, G=G[n].H / 2 * per_sample, n=total, bias=m.bias is not None)
            for n, m in layers.items()}


def _nll(likelihood, f, y):
    if likelihood == "classification":
        return nn.functional.cross_entropy(f, y, reduction="sum")
    return 0.5 * ((f - y.reshape(f.shape)) ** 2).sum()
