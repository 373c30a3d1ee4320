r"""Uncertainty metrics for classifiers and regressors.

Inputs are predictive probabilities ``probs`` ``(n, K)`` (rows sum to 1) and integer labels
``(n,)``; regression metrics take a Gaussian predictive ``(mean, var)``.

* NLL: :math:`-\frac1n\sum_i \log p_i[y_i]`.
* ECE (Guo et al. 2017): :math:`\sum_b \frac{|B_b|}{n}\,|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`
  over 15 equal-width confidence bins, or equal-mass ("adaptive") bins.
* Brier score: :math:`\frac1n\sum_i \sum_k (p_{ik} - [y_i = k])^2`.
* OOD AUROC: the probability that an out-of-distribution input gets a higher score (predictive
  entropy by default) than an in-distribution one, ties counting one half (Mann-Whitney U).
"""
from __future__ import annotations

import math

import torch

from ..errors import QBayesError


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise QBayesError(f"expected probs (n, K) and labels (n,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise QBayesError("no predictions to score: pass at least one row of probabilities and its label")


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels."""
    _check(probs, labels)
    p = probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return float(-(p.double().clamp_min(eps)).log().mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score (sum over classes, mean over examples)."""
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).double().mean())


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    _check(probs, labels)
    return float((probs.argmax(1) == labels).double().mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, adaptive: bool = False) -> float:
    """Expected calibration error of the top-class confidence.

    Equal-width bins ``(i/n_bins, (i+1)/n_bins]`` (the first also takes confidence 0), or with
    ``adaptive=True`` bins holding equal numbers of examples (sorted by confidence).
    """
    _check(probs, labels)
    conf, pred = probs.double().max(1)
    correct = (pred == labels).double()
    n = conf.numel()
    if adaptive:
        order = torch.argsort(conf, stable=True)  # ties keep their input order
        bins = torch.empty(n, dtype=torch.long)
        bins[order] = torch.arange(n) * n_bins // n
    else:
        bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    cnf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    return float((acc - cnf).abs().sum() / n)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``-Σ_k p_k log p_k`` per row (natural log)."""
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(1)


def auroc(scores_neg: torch.Tensor, scores_pos: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), from average ranks."""
    a, b = scores_neg.double().flatten(), scores_pos.double().flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise QBayesError("AUROC needs at least one in-distribution and one out-of-distribution example")
    s = torch.cat([a, b])
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    # average the ranks of ties
    uniq, inv = torch.unique(s, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
    counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / counts)[inv]
    u = ranks[a.numel():].sum() - b.numel() * (b.numel() + 1) / 2
    return float(u / (a.numel() * b.numel()))


def ood_auroc(probs_in: torch.Tensor, probs_out: torch.Tensor) -> float:
    """AUROC of telling out-of-distribution inputs apart by their higher predictive entropy."""
    return auroc(predictive_entropy(probs_in), predictive_entropy(probs_out))


def gaussian_nll(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``y`` under ``N(mean, var)`` (test log-likelihood = minus this)."""
    m, v, t = mean.double().flatten(), var.double().flatten(), y.double().flatten()
    return float((0.5 * (math.log(2 * math.pi) + v.log() + (t - m) ** 2 / v)).mean())


def rmse(mean: torch.Tensor, y: torch.Tensor) -> float:
    return float(((mean.double().flatten() - y.double().flatten()) ** 2).mean().sqrt())
