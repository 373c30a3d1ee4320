"""Curvature engine: layer statistics shared by solvers, bit allocation and Laplace."""
from .input_stats import InputSecondMoment

__all__ = ["InputSecondMoment"]
