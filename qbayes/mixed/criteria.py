r"""Closed-form sensitivity criteria: the predicted increase of the mean loss when one layer's
weight ``W`` is replaced by its quantized value ``W + ΔW``.

Each is a quadratic form in ``ΔW`` with a different curvature (all from :mod:`.stats`, i.e. from
:mod:`qbayes.curvature`):

* ``hawq`` (Dong et al. 2019/2020): :math:`\tfrac12\,\bar\lambda\,\|\Delta W\|^2` with
  :math:`\bar\lambda = \operatorname{tr}(\nabla^2_W L)/n` the Hutchinson estimate of the mean
  Hessian eigenvalue of the block;
* ``fisher`` (as in FIMA-Q): :math:`\tfrac12 \sum_{ij} F_{ij}\,\Delta W_{ij}^2` with the diagonal
  empirical Fisher;
* ``output``: :math:`\operatorname{tr}(\Delta W\, H\, \Delta W^\top)` with the GPTQ statistic
  ``H`` (twice the expected squared output error of the layer; not in loss units);
* ``posterior``: the Laplace posterior precision of the block as the per-weight importance,
  :math:`\tfrac12\,\mathrm{vec}(\Delta W)^\top P\, \mathrm{vec}(\Delta W)` with
  :math:`P = G\otimes A + (\lambda/N) I` (K-FAC, ``A = H/2``) or the diagonal
  :math:`P = \mathrm{diag}(\mathrm{GGN}) + \lambda/N`: the precision of the posterior over ``W``
  scaled to the mean loss; weights the posterior is unsure about (low precision) cost little
  to perturb, so they get fewer bits (cf. Variational Bayesian Quantization, Yang et al. 2020).
  The prior precision is set per layer by the evidence-style fixed point
  :math:`\lambda = n / \|W\|^2` (a Gaussian prior whose variance is the weights' mean square).
"""
from __future__ import annotations

import torch

from .stats import LayerStats

CLOSED_FORM = ("hawq", "fisher", "output", "posterior")


def hawq(dW: torch.Tensor, trace_per_param: float) -> float:
    return 0.5 * trace_per_param * float(dW.double().square().sum())


def fisher(dW: torch.Tensor, st: LayerStats) -> float:
    return 0.5 * float((st.ef_diag.double() * dW.double().square()).sum())


def output(dW: torch.Tensor, st: LayerStats) -> float:
    d = dW.double()
    return float(((d @ st.H.double()) * d).sum())


def prior_precision(W: torch.Tensor) -> float:
    """``λ = n / ‖W‖²``: the precision of an isotropic Gaussian prior matching the weights' scale."""
    return W.numel() / max(float(W.double().square().sum()), 1e-30)


def posterior(dW: torch.Tensor, st: LayerStats, W: torch.Tensor, structure: str = "kron") -> float:
    d = dW.double()
    prior = prior_precision(W) / st.n_tokens * float(d.square().sum())
    if structure == "kron":
        A = st.H.double() / 2
        like = float(((st.G.double() @ d @ A) * d).sum())
    elif structure == "diag":
        like = float((st.ggn_diag.double() * d.square()).sum())
    else:
        raise ValueError(f"unknown posterior structure {structure!r}: 'kron' or 'diag'")
    return 0.5 * (like + prior)
