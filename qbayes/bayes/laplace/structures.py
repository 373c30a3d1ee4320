r"""Posterior precision structures of the Laplace approximation.

Each holds the curvature :math:`H` of the log-likelihood at the MAP (computed with unit noise)
and answers, for a prior precision :math:`\lambda` and a likelihood scale :math:`s`
(:math:`1/\sigma^2` for Gaussian regression, 1 for classification), questions about the
posterior precision :math:`P = sH + \lambda I`:

* ``logdet(lam, s)``: :math:`\log\det P` (differentiable in both, for marginal-likelihood tuning);
* ``functional_var(J, lam, s)``: :math:`J P^{-1} J^\top` for Jacobians ``J`` ``(n, C, P)``;
* ``sample(k, lam, s)``: ``k`` draws from :math:`N(0, P^{-1})`, shape ``(k, P)``.

``full`` diagonalises :math:`H` once; ``diag`` keeps :math:`\mathrm{diag}(H)`; ``kron`` keeps
one :math:`N\,\bar G \otimes \bar A` block per linear layer and works in the eigenbases of the
factors, so every quantity costs only the factors' sizes.
"""
from __future__ import annotations

import torch

from ...curvature.kron import KronFactors


class FullStructure:
    def __init__(self, H: torch.Tensor):
        self.eigvals, self.eigvecs = torch.linalg.eigh(H.double())
        self.eigvals = self.eigvals.clamp_min(0)

    def _d(self, lam, s):
        return s * self.eigvals + lam

    def logdet(self, lam, s):
        return torch.log(self._d(lam, s)).sum()

    def covariance(self, lam, s):
        V = self.eigvecs
        return (V / self._d(lam, s)) @ V.T

    def functional_var(self, J, lam, s):
        JV = J.double() @ self.eigvecs
        return torch.einsum("ncp,p,nkp->nck", JV, 1 / self._d(lam, s), JV)

    def sample(self, k, lam, s, generator=None):
        z = torch.randn(k, self.eigvals.numel(), dtype=torch.float64, generator=generator)
        return (z / self._d(lam, s).sqrt()) @ self.eigvecs.T


class DiagStructure:
    def __init__(self, h: torch.Tensor):
        self.h = h.double().clamp_min(0)

    def _d(self, lam, s):
        return s * self.h + lam

    def logdet(self, lam, s):
        return torch.log(self._d(lam, s)).sum()

    def covariance(self, lam, s):
        return torch.diag(1 / self._d(lam, s))

    def functional_var(self, J, lam, s):
        J = J.double()
        return torch.einsum("ncp,p,nkp->nck", J, 1 / self._d(lam, s), J)

    def sample(self, k, lam, s, generator=None):
        z = torch.randn(k, self.h.numel(), dtype=torch.float64, generator=generator)
        return z / self._d(lam, s).sqrt()


class KronStructure:
    """Blocks for linear layers; ``layout`` maps each layer to its (weight, bias) slices of the
    flat parameter vector, so the layer's parameters are viewed as ``W̃ = [W | b]`` (out, in+1).
    The Kronecker algebra is :mod:`qbayes.curvature.kron`'s."""

    def __init__(self, factors: dict[str, KronFactors], layout: dict[str, tuple[slice, slice | None, int, int]]):
        self.blocks = [(name, f.eig(), layout[name]) for name, f in factors.items()]
        self.P = sum(lay[2] * lay[3] for *_, lay in self.blocks)

    def logdet(self, lam, s):
        return sum(e.logdet(s, lam) for _, e, _ in self.blocks)

    def _gather(self, J, lay):
        ws, bs, out, inp = lay
        Jw = J[..., ws].reshape(*J.shape[:-1], out, inp - (bs is not None))
        if bs is not None:
            Jw = torch.cat([Jw, J[..., bs].unsqueeze(-1)], -1)
        return Jw

    def functional_var(self, J, lam, s):
        J = J.double()
        total = 0
        for _, e, lay in self.blocks:
            Jt = e.to_eigbasis(self._gather(J, lay))  # (n, C, out, in+1) in the eigenbasis
            total = total + torch.einsum("ncoi,oi,nkoi->nck", Jt, 1 / e.eigvals(s, lam), Jt)
        return total

    def sample(self, k, lam, s, generator=None):
        out = torch.zeros(k, self.P, dtype=torch.float64)
        for _, e, (ws, bs, o, i) in self.blocks:
            W = e.sample(k, s, lam, generator)  # (k, out, in+1)
            if bs is not None:
                out[:, ws] = W[..., :-1].reshape(k, -1)
                out[:, bs] = W[..., -1]
            else:
                out[:, ws] = W.reshape(k, -1)
        return out

    def covariance(self, lam, s):
        """Dense covariance (small models only), assembled block by block."""
        C = torch.zeros(self.P, self.P, dtype=torch.float64)
        for _, e, (ws, bs, o, i) in self.blocks:
            blk = e.covariance(s, lam)  # over W̃ row-major
            idx = torch.arange(o * i).reshape(o, i)
            flat = torch.empty(o * i, dtype=torch.long)
            w_idx = torch.arange(ws.start, ws.stop).reshape(o, -1)
            flat[idx[:, : w_idx.shape[1]].reshape(-1)] = w_idx.reshape(-1)
            if bs is not None:
                flat[idx[:, -1]] = torch.arange(bs.start, bs.stop)
            C[flat[:, None], flat[None, :]] = blk
        return C
