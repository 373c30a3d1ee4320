r"""Gaussian mixtures as diffusion priors with everything in closed form: the noised marginals, the
exact denoiser ``ε*`` and the exact posterior of a linear-Gaussian measurement. The test bed of
the posterior samplers (:mod:`qbayes.diffusion.posterior`), as in the Gaussian-mixture
experiments of DPS (Chung et al. 2023) and MCGdiff (Cardoso et al. 2023).

Prior :math:`p(x) = \sum_k w_k N(x; μ_k, Σ_k)` in ``d`` dimensions, float64 throughout.

* Noised marginal at timestep ``t`` (:meth:`GaussianMixture.noised`): since
  :math:`x_t = \sqrt{ᾱ_t} x_0 + \sqrt{1-ᾱ_t} ε`,
  :math:`p_t(x) = \sum_k w_k N(x; \sqrt{ᾱ_t} μ_k, ᾱ_t Σ_k + (1-ᾱ_t) I)`.
* Exact denoiser (:meth:`GaussianMixture.eps_model`):
  :math:`ε^*(x, t) = -\sqrt{1-ᾱ_t}\,\nabla \log p_t(x)` with
  :math:`\nabla \log p_t(x) = \sum_k r_k(x)\, C_k^{-1}(\sqrt{ᾱ_t} μ_k - x)`,
  :math:`C_k = ᾱ_t Σ_k + (1-ᾱ_t) I`, :math:`r_k` the responsibilities. With
  :math:`Σ_k = U_k \mathrm{diag}(λ_k) U_k^T` every :math:`C_k` is
  :math:`U_k \mathrm{diag}(ᾱ λ_k + 1 - ᾱ) U_k^T`: one eigendecomposition serves all ``t``.
* Exact posterior of :math:`y = A x + σ_y n`, :math:`n \sim N(0, I)`
  (:meth:`GaussianMixture.posterior`): per component the Gaussian conditioning
  :math:`S_k = A Σ_k A^T + σ_y^2 I`, :math:`G_k = Σ_k A^T S_k^{-1}`,
  :math:`μ_k' = μ_k + G_k (y - A μ_k)`, :math:`Σ_k' = Σ_k - G_k A Σ_k`, and weights
  :math:`w_k' \propto w_k N(y; A μ_k, S_k)` (the evidence of component ``k``).
"""
from __future__ import annotations

import math

import torch

from ..errors import QBayesError
from .schedule import EpsModel, Schedule

_LOG2PI = math.log(2 * math.pi)


class GaussianMixture:
    """``weights`` ``(K,)`` (normalised here), ``means`` ``(K, d)``, ``covs`` ``(K, d, d)``
    symmetric positive definite; all stored as float64. Samples are ``(n, d)``."""

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covs, dtype=torch.float64)
        if mu.dim() != 2 or cov.dim() != 3 or w.numel() != mu.shape[0] or cov.shape != (mu.shape[0], mu.shape[1], mu.shape[1]):
            raise QBayesError(f"a Gaussian mixture needs weights (K,), means (K, d), covs (K, d, d); got "
                              f"{tuple(w.shape)}, {tuple(mu.shape)}, {tuple(cov.shape)}")
        if not all(bool(torch.isfinite(a).all()) for a in (w, mu, cov)):
            raise QBayesError("Gaussian mixture parameters must be finite (NaN or inf found)")
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise QBayesError("mixture weights must be non-negative with a positive sum")
        if not torch.allclose(cov, cov.transpose(1, 2), atol=1e-8 * max(1.0, float(cov.abs().max()))):
            raise QBayesError("mixture covariances must be symmetric")
        cov = (cov + cov.transpose(1, 2)) / 2
        lam, U = torch.linalg.eigh(cov)
        if bool((lam <= 0).any()):
            raise QBayesError(f"mixture covariances must be positive definite (smallest eigenvalue {float(lam.min()):.3g})")
        self.weights, self.means, self.covs = w / w.sum(), mu, cov
        self._lam, self._U = lam, U
        self._diag = bool((cov - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))).abs().max() == 0)
        if self._diag:  # keep the eigenvalues in coordinate order so U = I
            self._lam, self._U = torch.diagonal(cov, dim1=1, dim2=2).clone(), None

    @property
    def K(self) -> int:
        return self.weights.numel()

    @property
    def d(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, d={self.d})"

    # ------------------------------------------------------------------ moments and sampling
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        m = self.mean()
        dm = self.means - m
        return torch.einsum("k,kij->ij", self.weights, self.covs) + torch.einsum("k,ki,kj->ij", self.weights, dm, dm)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws ``(n, d)`` float64."""
        n = _count(n)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.d, dtype=torch.float64, generator=generator)
        if self._diag:
            return self.means[k] + z * self._lam[k].sqrt()
        return self.means[k] + torch.einsum("nij,nj->ni", self._U[k], z * self._lam[k].sqrt())

    # ------------------------------------------------------------------ densities and scores
    def _logits(self, x: torch.Tensor, scale: float, a: float, b: float, score: bool):
        """Per-component ``log w_k + log N(x; scale μ_k, a Σ_k + b I)`` ``(B, K)`` and, if asked,
        the mixture's score ``(B, d)``."""
        v = a * self._lam + b                                  # (K, d) eigenvalues of the covariances
        iv, mu = 1.0 / v, scale * self.means
        if self._diag:
            muv = mu * iv
            if score:  # closed-form score and its vector-Jacobian product (_DiagScore)
                logc = self.weights.log() - 0.5 * ((mu * muv).sum(1) + v.log().sum(1) + self.d * _LOG2PI)
                return None, _DiagScore.apply(x, logc, iv, muv)
            quad = (x * x) @ iv.T - 2 * x @ muv.T + (mu * muv).sum(1)
        else:
            K, d = self.K, self.d
            z = (x @ self._U.permute(1, 0, 2).reshape(d, K * d)).view(-1, K, d) - torch.einsum("kd,kde->ke", mu, self._U)
            quad = (z * z * iv).sum(-1)
        logits = self.weights.log() - 0.5 * (quad + v.log().sum(1) + self.d * _LOG2PI)
        if not score:
            return logits, None
        r = _softmax(logits)
        s = -(r.unsqueeze(-1) * z * iv).reshape(-1, self.K * self.d) @ self._U.permute(0, 2, 1).reshape(self.K * self.d, self.d)
        return logits, s

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` ``(B,)`` for ``x`` ``(B, d)`` (computed in float64)."""
        return torch.logsumexp(self._logits(self._flat(x), 1.0, 1.0, 0.0, False)[0], 1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``∇ log p(x)`` ``(B, d)`` float64, in closed form."""
        return self._logits(self._flat(x), 1.0, 1.0, 0.0, True)[1]

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._logits(self._flat(x), 1.0, 1.0, 0.0, False)[0], 1)

    # ------------------------------------------------------------------ diffusion
    def noised(self, schedule: Schedule, t: int) -> "GaussianMixture":
        """The exact marginal of ``x_t`` (module docstring); ``t < 0`` is the clean prior."""
        a = float(schedule.abar(int(t), self.means).flatten()[0])
        eye = torch.eye(self.d, dtype=torch.float64)
        return GaussianMixture(self.weights, math.sqrt(a) * self.means, a * self.covs + (1 - a) * eye)

    def eps_model(self, schedule: Schedule) -> EpsModel:
        """The exact denoiser ``ε*(x_t, t) = −√(1−ᾱ_t) ∇ log p_t(x_t)`` as an :data:`EpsModel`:
        ``x_t`` ``(B, d)`` (or ``(B, *shape)`` with ``prod(shape) = d``) in any float dtype, computed
        in float64 and returned in ``x_t``'s dtype; differentiable in ``x_t`` (autograd)."""
        abar = schedule.alphas_cumprod

        def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = self._flat(x_t)
            t = torch.as_tensor(t, dtype=torch.long).cpu().reshape(-1).expand(x.shape[0])
            levels = torch.unique(t).tolist()
            if len(levels) == 1:  # the usual case: one timestep for the whole batch
                out = self._eps(x, float(abar[levels[0]]) if levels[0] >= 0 else 1.0)
            else:
                rows = [(t == tv).nonzero().flatten() for tv in levels]
                pieces = [self._eps(x[r.to(x.device)], float(abar[tv]) if tv >= 0 else 1.0) for tv, r in zip(levels, rows)]
                out = torch.cat(pieces)[torch.argsort(torch.cat(rows)).to(x.device)]
            return out.to(x_t.dtype).view(x_t.shape)

        return eps

    def _eps(self, x: torch.Tensor, a: float) -> torch.Tensor:
        return -math.sqrt(1 - a) * self._logits(x, math.sqrt(a), a, 1 - a, True)[1]

    # ------------------------------------------------------------------ inverse problems
    def posterior(self, A, y, sigma_y: float) -> "GaussianMixture":
        """The exact posterior of ``x`` given ``y = A x + sigma_y n`` (module docstring). ``A`` is a
        matrix ``(m, d)`` or a linear operator with ``matrix()``; ``y`` is ``(m,)``. The posterior
        is degenerate for ``sigma_y = 0`` (no density), so ``sigma_y`` must be positive: use a small
        ``sigma_y`` such as ``1e-4`` for a near-noiseless measurement."""
        A = torch.as_tensor(A.matrix() if hasattr(A, "matrix") else A, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64).flatten()
        if A.dim() != 2 or A.shape[1] != self.d:
            raise QBayesError(f"A must be (m, {self.d}) for this mixture, got {tuple(A.shape)}")
        if y.numel() != A.shape[0]:
            raise QBayesError(f"y has {y.numel()} entries but A has {A.shape[0]} rows")
        if not bool(torch.isfinite(y).all()):
            raise QBayesError("y contains NaN or inf")
        if not isinstance(sigma_y, (int, float)) or not math.isfinite(sigma_y) or sigma_y <= 0:
            raise QBayesError(f"the exact posterior needs sigma_y > 0 (got {sigma_y!r}); for sigma_y = 0 it is "
                              "degenerate on {x: A x = y}: use a small positive sigma_y")
        m = A.shape[0]
        AS = A @ self.covs                                      # (K, m, d)
        S = AS @ A.T + sigma_y ** 2 * torch.eye(m, dtype=torch.float64)
        L = torch.linalg.cholesky(S)
        r = y - self.means @ A.T                                # (K, m)
        Sr = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
        G = torch.cholesky_solve(AS, L).transpose(1, 2)         # Σ Aᵀ S⁻¹ (K, d, m)
        means = self.means + torch.einsum("kdm,km->kd", G, r)
        covs = self.covs - G @ AS
        logdet = 2 * torch.diagonal(L, dim1=1, dim2=2).log().sum(1)
        log_ev = -0.5 * ((r * Sr).sum(1) + logdet + m * _LOG2PI)
        logw = self.weights.log() + log_ev
        return GaussianMixture(torch.softmax(logw, 0), means, (covs + covs.transpose(1, 2)) / 2)

    def log_evidence(self, A, y, sigma_y: float) -> float:
        """``log p(y) = log Σ_k w_k N(y; A μ_k, A Σ_k Aᵀ + σ_y² I)``."""
        A = torch.as_tensor(A.matrix() if hasattr(A, "matrix") else A, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64).flatten()
        S = A @ self.covs @ A.T + sigma_y ** 2 * torch.eye(A.shape[0], dtype=torch.float64)
        comp = torch.distributions.MultivariateNormal(self.means @ A.T, covariance_matrix=S)
        return float(torch.logsumexp(self.weights.log() + comp.log_prob(y), 0))

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
        if x.shape[1] != self.d:
            raise QBayesError(f"this mixture is {self.d}-dimensional, got samples of {x.shape[1]} values each")
        return x.to(torch.float64)


class _DiagScore(torch.autograd.Function):
    r"""The score of a mixture of diagonal Gaussians, :math:`s = Σ_k r_k s_k` with
    :math:`s_k = M_k − x ⊙ V_k` (``M = μ̃/v``, ``V = 1/v``), and its exact vector-Jacobian product
    :math:`J^T u = Σ_k c_k r_k (s_k − s) − u ⊙ (r V)`, :math:`c_k = u · s_k` (``J`` is the Hessian
    of ``log p``, symmetric): four ``(B, K) × (K, d)`` products and no ``(B, K, d)`` tensor.
    First order only (no double backward)."""

    @staticmethod
    def forward(ctx, x, logc, iv, muv):
        d = x.shape[1]
        r = _softmax(logc + torch.cat([x, x * x], 1) @ torch.cat([muv, -0.5 * iv], 1).T)
        both = r @ torch.cat([muv, iv], 1)                     # (B, 2d): r M | r V
        riv = both[:, d:]
        s = both[:, :d] - x * riv
        ctx.save_for_backward(x, r, riv, s, iv, muv)
        return s

    @staticmethod
    def backward(ctx, u):
        x, r, riv, s, iv, muv = ctx.saved_tensors
        d = x.shape[1]
        cr = (torch.cat([u, u * x], 1) @ torch.cat([muv, -iv], 1).T) * r
        both = cr @ torch.cat([muv, iv], 1)
        return both[:, :d] - x * both[:, d:] - s * cr.sum(1, keepdim=True) - u * riv, None, None, None


def random_mixture(d: int, K: int = 25, seed: int = 0, spacing: float = 8.0, var: float = 1.0,
                   random_weights: bool = False, anisotropy: float = 0.0) -> GaussianMixture:
    """The Gaussian-mixture prior of MCGdiff's experiments (Cardoso et al. 2023, §4.1): for a square
    ``K = k²``, means on a ``k × k`` grid repeated over the coordinates,
    ``μ_{ij} = spacing·(i, j, i, j, …)`` with ``i, j ∈ {−(k−1)/2, …, (k−1)/2}`` (``spacing`` 8 and
    ``k = 5`` is theirs), otherwise means drawn uniformly in a ball of radius
    ``spacing·√K / 2``; covariance ``var·I``, equal weights (``random_weights``: ``U(0, 1)`` drawn and
    normalised, as MCGdiff does). ``anisotropy > 0`` gives each component a random rotation and
    eigenvalues ``var·exp(U(−anisotropy, anisotropy))`` (still well conditioned). Seeded by
    ``seed``."""
    d, K = _count(d, "d"), _count(K, "K")
    g = torch.Generator().manual_seed(int(seed))
    k = math.isqrt(K)
    if k * k == K:
        c = (torch.arange(k, dtype=torch.float64) - (k - 1) / 2) * spacing
        ij = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(K, 2)
        means = ij.repeat(1, (d + 1) // 2)[:, :d]
    else:
        u = torch.randn(K, d, generator=g, dtype=torch.float64)
        r = torch.rand(K, 1, generator=g, dtype=torch.float64) ** (1.0 / d)
        means = u / u.norm(dim=1, keepdim=True) * r * spacing * math.sqrt(K) / 2
    w = torch.rand(K, generator=g, dtype=torch.float64) if random_weights else torch.ones(K, dtype=torch.float64)
    if anisotropy > 0:
        Q, _ = torch.linalg.qr(torch.randn(K, d, d, generator=g, dtype=torch.float64))
        lam = var * torch.exp((2 * torch.rand(K, d, generator=g, dtype=torch.float64) - 1) * anisotropy)
        covs = Q @ torch.diag_embed(lam) @ Q.transpose(1, 2)
    else:
        covs = var * torch.eye(d, dtype=torch.float64).expand(K, d, d).clone()
    return GaussianMixture(w, means, covs)


def _softmax(z: torch.Tensor) -> torch.Tensor:
    """Row softmax from elementwise ops (``torch.softmax`` on small float64 batches can cost
    milliseconds in thread start-up on a busy machine)."""
    e = (z - z.amax(1, keepdim=True)).exp()
    return e / e.sum(1, keepdim=True)


def _count(n, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QBayesError(f"{name} must be a positive int, got {n!r}")
    return n
