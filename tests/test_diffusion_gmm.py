"""The Gaussian-mixture prior's closed forms (noised marginals, exact denoiser, exact posterior), the
measurement operators against their dense matrices, and the sliced Wasserstein distance."""
import math

import numpy as np
import pytest
import torch

from qbayes.diffusion.gmm import GaussianMixture, random_mixture
from qbayes.diffusion.operators import Blur, Downsample, Linear, Mask, Sign, box_mask, random_mask
from qbayes.diffusion.schedule import Schedule
from qbayes.errors import QBayesError
from qbayes.eval.sliced_wasserstein import sliced_wasserstein

S = Schedule.linear(1000)
G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


@pytest.fixture(params=["diag", "full"])
def prior(request):
    return random_mixture(3, 4, seed=1, spacing=2.0, anisotropy=0.5 if request.param == "full" else 0.0)


# ---------------------------------------------------------------------------------- mixture
def test_noised_score_matches_autograd_of_log_prob(prior):
    x = torch.randn(7, 3, dtype=torch.float64, generator=G(0)) * 2
    for t in (0, 250, 999):
        pt = prior.noised(S, t)
        xx = x.clone().requires_grad_(True)
        g = torch.autograd.grad(pt.log_prob(xx).sum(), xx)[0]
        assert torch.allclose(pt.score(x), g, atol=1e-10)
        eps = prior.eps_model(S)(x.float(), torch.full((7,), t))
        a = float(S.alphas_cumprod[t])
        assert eps.dtype == torch.float32
        assert torch.allclose(eps.double(), -math.sqrt(1 - a) * g, atol=1e-5)


def test_eps_model_is_differentiable_and_takes_mixed_timesteps(prior):
    eps = prior.eps_model(S)
    x = torch.randn(5, 3, dtype=torch.float64, generator=G(1), requires_grad=True)
    t = torch.tensor([10, 500, 10, 999, 500])
    assert torch.autograd.gradcheck(lambda z: eps(z, t), (x,))
    one = torch.cat([eps(x[i:i + 1], t[i:i + 1]) for i in range(5)])
    assert torch.allclose(eps(x, t), one)


def test_exact_denoiser_matches_monte_carlo_tweedie(prior):
    """ε* gives Tweedie's E[x_0 | x_t]; estimate it by self-normalised importance sampling."""
    t, a = 400, float(S.alphas_cumprod[400])
    x0 = prior.sample(200_000, G(2))
    xt = torch.tensor([[0.5, -0.3, 1.0], [-1.5, 0.8, 0.0]], dtype=torch.float64)
    lw = -((xt[:, None] - math.sqrt(a) * x0[None]) ** 2).sum(-1) / (2 * (1 - a))
    mc = torch.einsum("bn,nd->bd", torch.softmax(lw, 1), x0)
    exact = S.predict_x0(xt, prior.eps_model(S)(xt, torch.full((2,), t)), t)
    assert torch.allclose(exact, mc, atol=0.03)


def test_noised_marginal_matches_forward_process(prior):
    x0 = prior.sample(100_000, G(3))
    xt = S.add_noise(x0, torch.randn(x0.shape, dtype=torch.float64, generator=G(4)), 300)
    pt = prior.noised(S, 300)
    assert torch.allclose(xt.mean(0), pt.mean(), atol=0.03)
    assert torch.allclose(torch.cov(xt.T), pt.cov(), atol=0.06)


def test_posterior_single_gaussian_is_standard_conditioning():
    g = G(5)
    L = torch.randn(3, 3, dtype=torch.float64, generator=g)
    cov, mu = L @ L.T + 0.5 * torch.eye(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64, generator=g)
    A, y, s = torch.randn(2, 3, dtype=torch.float64, generator=g), torch.tensor([0.3, -1.0], dtype=torch.float64), 0.4
    post = GaussianMixture([1.0], mu[None], cov[None]).posterior(A, y, s)
    prec = torch.linalg.inv(cov) + A.T @ A / s ** 2   # information form
    pc = torch.linalg.inv(prec)
    assert torch.allclose(post.covs[0], pc, atol=1e-10)
    assert torch.allclose(post.means[0], pc @ (torch.linalg.solve(cov, mu) + A.T @ y / s ** 2), atol=1e-10)


def test_posterior_mixture_against_a_grid():
    prior = random_mixture(2, 9, seed=2, spacing=2.0, random_weights=True, anisotropy=0.4)
    A, y, s = torch.tensor([[0.6, -0.8]], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64), 0.5
    post = prior.posterior(A, y, s)
    u = torch.linspace(-9, 9, 601, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    lp = prior.log_prob(grid) + Linear(A).log_likelihood(grid, y[None], s)
    # log posterior − (log prior + log likelihood) = −log evidence, the same everywhere
    diff = post.log_prob(grid) - lp
    keep = post.log_prob(grid) > -20
    assert float(diff[keep].std()) < 1e-8
    assert abs(float(-diff[keep].mean()) - prior.log_evidence(A, y, s)) < 1e-8
    w = torch.softmax(lp, 0)
    grid_evidence = float(torch.logsumexp(lp, 0)) + 2 * math.log(float(u[1] - u[0]))  # ∫ p(x) p(y|x) dx
    assert abs(grid_evidence - prior.log_evidence(A, y, s)) < 1e-4
    assert torch.allclose(w @ grid, post.mean(), atol=1e-4)


def test_mixture_errors():
    prior = random_mixture(2, 4)
    with pytest.raises(QBayesError, match="sigma_y > 0"):
        prior.posterior(torch.eye(2), torch.zeros(2), 0.0)
    with pytest.raises(QBayesError, match="NaN"):
        prior.posterior(torch.eye(2), torch.tensor([0.0, float("nan")]), 0.1)
    with pytest.raises(QBayesError, match="rows"):
        prior.posterior(torch.eye(2), torch.zeros(3), 0.1)
    with pytest.raises(QBayesError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]])
    with pytest.raises(QBayesError, match="2-dimensional"):
        prior.log_prob(torch.zeros(4, 3))
    with pytest.raises(QBayesError, match="positive int"):
        prior.sample(0)


def test_random_mixture_is_the_mcgdiff_grid():
    p = random_mixture(4, 25, seed=0)
    assert p.K == 25 and torch.allclose(p.weights, torch.full((25,), 0.04, dtype=torch.float64))
    assert set(p.means[:, 0].tolist()) == {-16.0, -8.0, 0.0, 8.0, 16.0}
    assert torch.equal(p.means[:, 0], p.means[:, 2])
    assert torch.equal(random_mixture(5, 7, seed=3).means, random_mixture(5, 7, seed=3).means)


# ---------------------------------------------------------------------------------- operators
def _linear_ops():
    g = G(6)
    return [Linear(torch.randn(3, 5, dtype=torch.float64, generator=g)),
            Linear(torch.randn(6, 4, dtype=torch.float64, generator=g)),          # m > d
            Mask(random_mask((1, 4, 5), 0.7, g)),
            Mask(box_mask((2, 4, 4))),
            Blur.gaussian(1.0, (1, 5, 6), size=3),
            Blur.gaussian(0.8, (2, 5, 5), size=5, padding="reflect"),
            Downsample(2, (2, 4, 6))]


@pytest.mark.parametrize("op", _linear_ops(), ids=lambda o: type(o).__name__)
def test_linear_operator_against_its_dense_matrix(op):
    g = G(7)
    M = op.matrix()
    d = math.prod(op.in_shape)
    x = torch.randn(4, *op.in_shape, dtype=torch.float64, generator=g)
    y = op.forward(x)
    assert torch.allclose(y.reshape(4, -1), x.reshape(4, -1) @ M.T, atol=1e-12)
    v = torch.randn(y.shape, dtype=torch.float64, generator=g)
    at = op.adjoint(v)
    assert at.shape == x.shape
    assert torch.allclose((y * v).sum((1,) if y.dim() == 2 else tuple(range(1, y.dim()))),
                          (x * at).reshape(4, -1).sum(1), atol=1e-10)      # <Ax, v> = <x, Aᵀv>
    assert torch.allclose(at.reshape(4, -1), v.reshape(4, -1) @ M, atol=1e-12)
    Mp = torch.as_tensor(np.linalg.pinv(M.numpy()))
    assert torch.allclose(op.pinv(v).reshape(4, -1), v.reshape(4, -1) @ Mp.T, atol=1e-7)
    for scale, shift in ((0.3, 0.05), (2.0, 0.0)):
        Gm = scale * M @ M.T + shift * torch.eye(M.shape[0], dtype=torch.float64)
        want = v.reshape(4, -1) @ torch.linalg.pinv(Gm).T
        assert torch.allclose(op.solve_gram(v, scale, shift).reshape(4, -1), want, atol=1e-7)
    assert M.shape[1] == d


def test_mask_and_downsample_closed_forms():
    m = box_mask((1, 8, 8))
    assert int((~m).sum()) == 16 and not bool(m[0, 3, 3]) and bool(m[0, 0, 0])
    r = random_mask((3, 10, 10), 0.7, G(8))
    assert int((~r[0]).sum()) == 70 and torch.equal(r[0], r[2])
    up = Downsample(2).pinv(torch.arange(4.0).view(1, 1, 2, 2))
    assert torch.equal(up[0, 0], torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]))


def test_sign_probit_likelihood():
    A = torch.randn(4, 3, dtype=torch.float64, generator=G(9))
    op = Sign(A)
    x = torch.randn(2, 3, dtype=torch.float64, generator=G(10))
    y = op.forward(x)
    assert set(y.unique().tolist()) <= {-1.0, 1.0}
    phi = torch.distributions.Normal(0.0, 1.0).cdf
    want = phi(y * (x @ A.T) / 0.3).log().sum(1)
    assert torch.allclose(op.log_likelihood(x, y, 0.3), want, atol=1e-10)
    with pytest.raises(QBayesError, match="sigma_y > 0"):
        op.log_likelihood(x, y, 0.0)
    assert not op.linear


def test_operator_errors():
    op = Linear(torch.eye(3))
    with pytest.raises(QBayesError, match="shape"):
        op.check_y(torch.zeros(4))
    with pytest.raises(QBayesError, match="NaN"):
        op.check_y(torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(QBayesError, match=">= 0"):
        op.log_likelihood(torch.zeros(1, 3), torch.zeros(1, 3), -1.0)
    with pytest.raises(QBayesError, match="divisible"):
        Downsample(3, (1, 4, 4))
    with pytest.raises(QBayesError, match="odd"):
        Blur(torch.ones(2, 2), (1, 4, 4))
    with pytest.raises(QBayesError, match="expects"):
        op.forward(torch.zeros(2, 4))


# ---------------------------------------------------------------------------------- sliced W
def test_sliced_wasserstein_closed_forms():
    g = G(11)
    q = torch.special.ndtri((torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000)  # N(0,1) quantiles
    a, b = q[torch.randperm(20_000, generator=g)] * 1.0 + 0.5, q * 2.0 - 1.0
    assert abs(sliced_wasserstein(a, b, projections=1) ** 2 - (1.5 ** 2 + 1.0 ** 2)) < 2e-3   # 1-D: W2
    d, dm = 5, torch.tensor([1.0, -2.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    x = torch.randn(10_000, d, dtype=torch.float64, generator=g) * 0.5
    y = torch.randn(10_000, d, dtype=torch.float64, generator=g) * 1.5 + dm
    want = float(dm @ dm) / d + 1.0 ** 2          # ‖Δm‖²/d + (s1 − s2)²
    assert abs(sliced_wasserstein(x, y, projections=1000, generator=G(12)) ** 2 - want) < 0.05 * want


def test_sliced_wasserstein_properties():
    g = G(13)
    x = torch.randn(300, 3, dtype=torch.float64, generator=g)
    y = torch.randn(200, 3, dtype=torch.float64, generator=g) + 0.5
    assert sliced_wasserstein(x, x, generator=G(0)) == 0.0
    assert sliced_wasserstein(x, torch.cat([x, x]), generator=G(0)) < 1e-12   # same measure, unequal sizes
    assert sliced_wasserstein(x, y, generator=G(0)) == pytest.approx(sliced_wasserstein(y, x, generator=G(0)))
    # unequal sizes: exact quantile integral; 1-D brute force on a fine u grid
    xs, ys = x[:, 0].sort().values, y[:, 0].sort().values
    u = (torch.arange(600_000, dtype=torch.float64) + 0.5) / 600_000
    brute = ((xs[(u * 300).long()] - ys[(u * 200).long()]) ** 2).mean()
    assert sliced_wasserstein(x[:, 0], y[:, 0], projections=1) ** 2 == pytest.approx(float(brute), rel=1e-4)
    with pytest.raises(QBayesError, match="dimension"):
        sliced_wasserstein(x, torch.zeros(5, 2))
    with pytest.raises(QBayesError, match="NaN"):
        sliced_wasserstein(x, torch.full((5, 3), float("nan")))
