"""Posterior samplers (DPS, ΠGDM, RED-diff, SMC/TDS) on Gaussian-mixture priors with the exact
denoiser, where the posterior is known in closed form."""
import pytest
import torch

from qbayes.diffusion.gmm import GaussianMixture, random_mixture
from qbayes.diffusion.operators import Linear, Mask, Sign
from qbayes.diffusion.posterior import SMCResult, dps, pigdm, reddiff, smc
from qbayes.diffusion.schedule import Schedule
from qbayes.errors import QBayesError
from qbayes.eval.sliced_wasserstein import random_directions, sliced_wasserstein

S = Schedule.linear(1000)
G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
PRIOR2 = random_mixture(2, 4, seed=0, spacing=3.0)
Y = torch.tensor([1.2, -0.7])
IDENTITY = Linear(torch.eye(2))


def _gaussian(d=3, seed=0, unit=False):
    g = G(seed)
    if unit:
        return GaussianMixture([1.0], torch.zeros(1, d), torch.eye(d)[None])
    L = torch.randn(d, d, dtype=torch.float64, generator=g) * 0.5
    return GaussianMixture([1.0], torch.randn(1, d, dtype=torch.float64, generator=g), (L @ L.T + 0.5 * torch.eye(d))[None])


def _moments_close(x, post, mean_tol, cov_tol):
    x = x.double()
    assert torch.allclose(x.mean(0), post.means[0], atol=mean_tol), (x.mean(0), post.means[0])
    assert torch.allclose(torch.cov(x.T), post.covs[0], atol=cov_tol), (torch.cov(x.T), post.covs[0])


# ------------------------------------------------------------------ σ_y → 0 returns the measurement
def test_dps_identity_noiseless_returns_the_measurement():
    eps = PRIOR2.eps_model(S)
    x = dps(eps, S, IDENTITY, Y, 1e-3, 32, steps=100, generator=G(0), guidance="likelihood")
    assert x.shape == (32, 2) and float((x - Y).norm(dim=1).max()) < 1e-3
    # the paper's normalised step has a fixed length ζ, so it ends within ζ of y
    x = dps(eps, S, IDENTITY, Y, 1e-3, 32, steps=1000, generator=G(0), scale=0.05)
    assert float((x - Y).norm(dim=1).max()) < 0.1


def test_pigdm_identity_noiseless_returns_the_measurement():
    for sigma in (1e-3, 0.0):
        x = pigdm(PRIOR2.eps_model(S), S, IDENTITY, Y, sigma, 32, steps=50, generator=G(1))
        assert float((x - Y).norm(dim=1).max()) < 2e-3


def test_reddiff_identity_noiseless_fits_the_measurement():
    x = reddiff(PRIOR2.eps_model(S), S, IDENTITY, Y, 1e-3, 8, steps=200, generator=G(2))
    assert x.shape == (8, 2) and float((x - Y).norm(dim=1).max()) < 0.02


# ------------------------------------------------------------------ exact on Gaussian priors
def test_pigdm_is_exact_for_a_unit_gaussian_prior():
    """For N(0, I) data ΠGDM's r_t² = 1 − ᾱ_t is the true spread of x_0 | x_t: its guided x̂_0 is
    E[x_0 | x_t, y] and the sampler draws the posterior (up to discretisation)."""
    prior = _gaussian(unit=True)
    A = torch.tensor([[1.0, 0.5, -0.3]], dtype=torch.float64)
    y, s = torch.tensor([0.8]), 0.3
    x = pigdm(prior.eps_model(S), S, Linear(A), y, s, 3000, steps=100, generator=G(3), dtype=torch.float64)
    _moments_close(x, prior.posterior(A, y, s), 0.06, 0.08)


def test_smc_matches_a_gaussian_posterior():
    prior = _gaussian(seed=4)
    A = torch.tensor([[1.0, -0.5, 0.8], [0.2, 1.0, 0.0]], dtype=torch.float64)
    y, s = torch.tensor([1.5, -0.4]), 0.2
    out = smc(prior.eps_model(S), S, Linear(A), y, s, 400, steps=50, particles=16, generator=G(5))
    assert isinstance(out, SMCResult) and out.samples.shape == (400, 3)
    assert out.ess.shape == (51, 400) and out.resampled.shape == (50, 400)
    assert float(out.ess.min()) >= 1.0 - 1e-9 and float(out.ess.max()) <= 16 + 1e-9
    post = prior.posterior(A, y, s)
    sd = post.covs[0].diagonal().sqrt()   # 4 standard errors of the mean, ~3.5 of the covariance
    _moments_close(out.samples, post, float(4 * sd.max() / 20), float(0.25 * post.covs[0].abs().max()))


def test_smc_distance_falls_with_particles():
    """A weak twist (data_var huge: nearly flat until the end) leaves the work to the weights, so
    16 particles per sample are visibly too few and 256 close to the exact posterior."""
    A = torch.tensor([[1.0, 0.5], [-0.3, 1.0]], dtype=torch.float64)
    y, s = torch.tensor([0.4, 1.2]), 0.1
    post = PRIOR2.posterior(A, y, s)
    ref, th = post.sample(20_000, G(0)), random_directions(200, 2, G(0))
    sw = {N: sliced_wasserstein(smc(PRIOR2.eps_model(S), S, Linear(A), y, s, 300, steps=25, particles=N,
                                    data_var=1e4, generator=G(1)).samples, ref, directions=th) for N in (16, 256)}
    assert sw[256] < 0.75 * sw[16]


# ------------------------------------------------------------------ shapes, operators, errors
def test_samplers_keep_image_shapes():
    """x of shape (n, 1, 4, 4): a 16-dimensional mixture seen as images, a random-pixel mask."""
    prior = random_mixture(16, 4, seed=1, spacing=2.0)
    eps = prior.eps_model(S)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask.view(-1)[::3] = True
    op = Mask(mask)
    y = op.measure(prior.sample(1, G(6)).float().view(1, 1, 4, 4), 0.1, G(7))[0]
    for f, kw in ((dps, {}), (pigdm, {}), (reddiff, {}), (smc, {"particles": 4})):
        out = f(eps, S, op, y, 0.1, 3, steps=10, generator=G(8), **kw)
        x = out.samples if isinstance(out, SMCResult) else out
        assert x.shape == (3, 1, 4, 4) and bool(torch.isfinite(x).all())


def test_sign_operator_with_likelihood_guidance():
    A = torch.randn(6, 2, dtype=torch.float64, generator=G(9))
    op = Sign(A)
    y = op.measure(torch.tensor([[2.0, -1.0]], dtype=torch.float64), 0.1, G(10))[0]
    x = dps(PRIOR2.eps_model(S), S, op, y, 0.1, 16, steps=50, generator=G(11), guidance="likelihood", scale=0.01)
    assert bool(torch.isfinite(x).all())
    out = smc(PRIOR2.eps_model(S), S, op, y, 0.1, 16, steps=50, particles=8, twist="dps", generator=G(12))
    assert bool(torch.isfinite(out.samples).all())
    with pytest.raises(QBayesError, match="linear"):
        pigdm(PRIOR2.eps_model(S), S, op, y, 0.1, 4, steps=10)
    with pytest.raises(QBayesError, match="linear"):
        dps(PRIOR2.eps_model(S), S, op, y, 0.1, 4, steps=10)
    with pytest.raises(QBayesError, match="twist"):
        smc(PRIOR2.eps_model(S), S, op, y, 0.1, 4, steps=10)


def test_seeded_samplers_are_reproducible():
    eps = PRIOR2.eps_model(S)
    for f in (dps, pigdm, reddiff):
        a = f(eps, S, IDENTITY, Y, 0.1, 4, steps=10, generator=G(13))
        assert torch.equal(a, f(eps, S, IDENTITY, Y, 0.1, 4, steps=10, generator=G(13)))
    a = smc(eps, S, IDENTITY, Y, 0.1, 4, steps=10, particles=8, generator=G(14)).samples
    assert torch.equal(a, smc(eps, S, IDENTITY, Y, 0.1, 4, steps=10, particles=8, generator=G(14)).samples)


@pytest.mark.parametrize("f", [dps, pigdm, reddiff, smc], ids=lambda f: f.__name__)
def test_bad_input_is_refused(f):
    eps = PRIOR2.eps_model(S)
    with pytest.raises(QBayesError, match="shape"):
        f(eps, S, IDENTITY, torch.zeros(3), 0.1, 4, steps=10)
    with pytest.raises(QBayesError, match="NaN"):
        f(eps, S, IDENTITY, torch.tensor([0.0, float("nan")]), 0.1, 4, steps=10)
    with pytest.raises(QBayesError, match="sigma_y"):
        f(eps, S, IDENTITY, Y, -0.1, 4, steps=10)
    with pytest.raises(QBayesError, match="positive int"):
        f(eps, S, IDENTITY, Y, 0.1, 0, steps=10)
    with pytest.raises(QBayesError, match="steps"):
        f(eps, S, IDENTITY, Y, 0.1, 4, steps=0)
    if f in (smc, reddiff):
        with pytest.raises(QBayesError, match="sigma_y > 0"):
            f(eps, S, IDENTITY, Y, 0.0, 4, steps=10)
