r"""Post-quantization integral (PQI; Hu et al. 2025, the ReQuant paper): the loss change of a
quantization ``W → W + ΔW`` written exactly as a path integral of the gradient,

.. math:: L(W + \Delta W) - L(W) = \int_0^1 \nabla L(W + t\,\Delta W) \cdot \Delta W \, dt
          = \sum_{\ell} \underbrace{\int_0^1 \nabla_{W_\ell} L(W + t\,\Delta W)\cdot \Delta W_\ell\, dt}_{\mathrm{PQI}_\ell},

evaluated by Gauss-Legendre quadrature in ``t``. Unlike first- or second-order Taylor terms at
``W`` it stays accurate when ``ΔW`` is large (2-3 bits), where the loss is far from quadratic.
The path moves every selected layer at once (as in the paper), so the per-layer terms are an
exact additive attribution of the whole model's loss change to its layers (interactions
included), at the cost of ``nodes`` forward-backward passes per bit-width.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import QBayesError
from ..models.adapter import adapter_for


def gauss_legendre_01(nodes: int) -> tuple[list[float], list[float]]:
    """Nodes and weights of ``nodes``-point Gauss-Legendre quadrature on ``[0, 1]``."""
    if nodes < 1:
        raise QBayesError(f"PQI needs at least one quadrature node, got {nodes}")
    x, w = np.polynomial.legendre.leggauss(nodes)
    return [float((xi + 1) / 2) for xi in x], [float(wi / 2) for wi in w]


def pqi(model: nn.Module, layers: Mapping[str, nn.Linear], batches, deltas: Mapping[str, torch.Tensor],
        nodes: int = 4, progress: bool = True, desc: str = "PQI") -> dict[str, float]:
    """Per-layer PQI of the joint perturbation ``deltas`` (``{layer: ΔW}``) on the model's mean
    loss (its adapter's, with observed targets: next-token cross-entropy for an LM) over
    ``batches``, averaged over batches."""
    adapter = adapter_for(model)
    batches = adapter.batches(batches)
    missing = set(layers) - set(deltas)
    if missing:
        raise QBayesError(f"no perturbation given for layer(s) {sorted(missing)[:3]}")
    ts, ws = gauss_legendre_01(nodes)
    names = list(layers)
    weights = [layers[n].weight for n in names]
    orig = [w.detach().clone() for w in weights]
    flags = [w.requires_grad for w in weights]
    score = {n: 0.0 for n in names}
    bar = tqdm(total=len(ts) * len(batches), desc=desc, unit="pass", disable=not progress)
    try:
        for w in weights:
            w.requires_grad_(True)
        for t, wt in zip(ts, ws):
            with torch.no_grad():
                for w, o, n in zip(weights, orig, names):
                    w.copy_(o + t * deltas[n].to(o))
            for ids in batches:
                with torch.enable_grad():
                    loss = adapter.loss(ids) / len(batches)
                    grads = torch.autograd.grad(loss, weights)
                for n, g in zip(names, grads):
                    score[n] += wt * float((g.double() * deltas[n].double()).sum())
                bar.update()
    finally:
        bar.close()
        with torch.no_grad():
            for w, o, f in zip(weights, orig, flags):
                w.copy_(o)
                w.requires_grad_(f)
    return score
