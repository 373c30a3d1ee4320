"""Bayesian posteriors for neural networks, and uncertainty metrics."""
from . import metrics

__all__ = ["metrics"]
