r"""Posterior-guided importance: the Laplace posterior precision of the layer's weights,

.. math:: \Delta L \approx \tfrac12\,\mathrm{vec}(\Delta W)^\top P\,\mathrm{vec}(\Delta W),\qquad
          P = G\otimes A + (\lambda/N)\,I \ \text{(K-FAC, } A = H/2\text{)}\quad\text{or}\quad
          P = \mathrm{diag}(\mathrm{GGN}) + \lambda/N,

the precision of the Laplace posterior over ``W`` after ``N`` training examples (``N·GGN + λ``),
divided by ``N`` to put it in units of the mean loss, with GGN factors from labels sampled from
the model on the sensitivity set (:func:`qbayes.curvature.collect`); the Kronecker quadratic
form is :mod:`qbayes.curvature.kron`'s, the one the K-FAC Laplace posterior uses. ``N`` is the size of the data the model was
trained on (default ``1e12`` tokens, the scale of LLM pre-training, where the prior term is
negligible), not the few hundred tokens of the sensitivity set. Weights the posterior is unsure about (low
precision) cost little to perturb, so they get fewer bits (cf. Variational Bayesian
Quantization, Yang et al. 2020). The prior precision is set per layer by the evidence-style
fixed point :math:`\lambda = n / \|W\|^2` (an isotropic Gaussian prior whose variance is the
weights' mean square).
"""
from __future__ import annotations

import torch

from ..curvature import LayerStatistics
from ..curvature.kron import KronFactors
from ..errors import QBayesError


def prior_precision(W: torch.Tensor) -> float:
    """``λ = n / ‖W‖²``: the precision of an isotropic Gaussian prior matching the weights' scale."""
    return W.numel() / max(float(W.detach().double().square().sum()), 1e-30)


DEFAULT_NUM_DATA = 1e12


def posterior(dW: torch.Tensor, st: LayerStatistics, W: torch.Tensor, structure: str = "kron",
              num_data: float = DEFAULT_NUM_DATA) -> float:
    d = dW.double()
    prior = prior_precision(W) / num_data * float(d.square().sum())
    if structure == "kron":
        like = KronFactors(A=st.H.double() / 2, G=st.G).quad(d)
    elif structure == "diag":
        like = float((st.ggn_diag.double() * d.square()).sum())
    else:
        raise QBayesError(f"unknown posterior structure {structure!r}: 'kron' or 'diag'")
    return 0.5 * (like + prior)
