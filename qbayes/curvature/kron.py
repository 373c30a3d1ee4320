r"""Kronecker-factored curvature (K-FAC, Martens & Grosse 2015): the algebra, in one place.

A layer with (optionally bias-augmented) input factor :math:`A` ``(in, in)`` and output factor
:math:`G` ``(out, out)`` (both from :func:`qbayes.curvature.collect`) has the GGN block
:math:`N\,G \otimes A` over its weight ``W`` ``(out, in)`` flattened row-major (``n`` samples).

* :meth:`KronFactors.quad`: :math:`\mathrm{vec}(D)^\top (G \otimes A)\,\mathrm{vec}(D) =
  \mathrm{tr}(G D A D^\top)`, the second-order loss change of a perturbation ``D`` per sample
  (the posterior-guided bit allocation);
* :class:`KronEig`: the eigenbases of both factors, in which the posterior precision
  :math:`sN\,G\otimes A + \lambda I` is diagonal, with eigenvalues :math:`sN g_i a_j + \lambda`:
  log-determinant, sampling and the change of basis (the K-FAC Laplace posterior).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KronFactors:
    A: torch.Tensor  # (in, in) mean input second moment (bias-augmented if the layer has a bias)
    G: torch.Tensor  # (out, out) mean summed output-gradient second moment
    n: int = 1       # samples the factors average over
    bias: bool = False

    def quad(self, D: torch.Tensor) -> float:
        """``tr(G D A Dᵀ)`` in float64 for a perturbation ``D`` ``(out, in)``."""
        d = D.double()
        return float(((self.G.double() @ d @ self.A.double()) * d).sum())

    def eig(self) -> "KronEig":
        a, QA = torch.linalg.eigh(self.A.double())
        g, QG = torch.linalg.eigh(self.G.double())
        return KronEig(a.clamp_min(0), QA, g.clamp_min(0), QG, self.n)


@dataclass
class KronEig:
    """``G = QG diag(g) QGᵀ``, ``A = QA diag(a) QAᵀ`` (eigenvalues clamped at 0)."""

    a: torch.Tensor
    QA: torch.Tensor
    g: torch.Tensor
    QG: torch.Tensor
    n: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.g.numel(), self.a.numel()

    def eigvals(self, scale, prior) -> torch.Tensor:
        """Eigenvalues ``s n g_i a_j + λ`` of the precision ``s n G⊗A + λI``, as ``(out, in)``."""
        return scale * self.n * torch.outer(self.g, self.a) + prior

    def to_eigbasis(self, M: torch.Tensor) -> torch.Tensor:
        """``QGᵀ M QA`` for ``M`` ``(..., out, in)``."""
        return self.QG.T @ M @ self.QA

    def from_eigbasis(self, M: torch.Tensor) -> torch.Tensor:
        return self.QG @ M @ self.QA.T

    def logdet(self, scale, prior) -> torch.Tensor:
        return torch.log(self.eigvals(scale, prior)).sum()

    def sample(self, k: int, scale, prior, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` draws from ``N(0, (s n G⊗A + λI)⁻¹)``, each ``(out, in)``: ``(k, out, in)``."""
        z = torch.randn(k, *self.shape, dtype=torch.float64, generator=generator)
        return self.from_eigbasis(z / self.eigvals(scale, prior).sqrt())

    def covariance(self, scale, prior) -> torch.Tensor:
        """Dense ``(out·in, out·in)`` covariance over ``vec(W)`` row-major (small layers only)."""
        Q = torch.kron(self.QG, self.QA)
        return (Q / self.eigvals(scale, prior).reshape(-1)) @ Q.T
