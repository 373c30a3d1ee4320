"""Gaussian VI against known optima on a 2-D Gaussian target."""
import copy

import torch

from qbayes.bayes import vi

MU = torch.tensor([1.0, -1.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
PREC = torch.linalg.inv(SIGMA)


def log_post(params, batch):
    d = params["x"] - MU
    return -0.5 * d @ PREC @ d, None


def decay(lr0, steps):
    return lambda t: lr0 * max(0.02, 1 - t / steps)


def fit(transform, steps, seed=0):
    torch.manual_seed(seed)
    state = transform.init({"x": torch.zeros(2, dtype=torch.float64)})
    for _ in range(steps):
        state = transform.update(state, None, inplace=True)
    return state


def test_mean_field_finds_the_optimal_diagonal():
    """The KL(q||p)-optimal mean-field Gaussian has the true mean and variances 1/Λ_ii."""
    state = fit(vi.diag(log_post, lr=decay(0.05, 1500), n_samples=16, init_log_sd=0.0), 1500)
    torch.testing.assert_close(state.params["x"], MU, atol=0.05, rtol=0)
    var = torch.diagonal(vi.covariance(state))
    torch.testing.assert_close(var, 1 / torch.diagonal(PREC), rtol=0.1, atol=0)


def test_low_rank_plus_diagonal_recovers_the_full_covariance():
    state = fit(vi.lowrank(log_post, rank=1, lr=decay(0.05, 2000), n_samples=16, init_log_sd=0.0, init_factor_sd=0.3), 2000)
    torch.testing.assert_close(state.params["x"], MU, atol=0.05, rtol=0)
    torch.testing.assert_close(vi.covariance(state), SIGMA, atol=0.15, rtol=0)


def test_lowrank_logdet_matrix_determinant_lemma():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    V = torch.randn(6, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vi.lowrank_logdet(d, V), torch.logdet(torch.diag(d**2) + V @ V.T))


def test_functional_and_inplace_agree():
    for t in (vi.diag(log_post, n_samples=2), vi.lowrank(log_post, rank=1, n_samples=2)):
        torch.manual_seed(0)
        s0 = t.init({"x": torch.zeros(2, dtype=torch.float64)})
        before = copy.deepcopy(s0)
        s = t.update(t.update(s0, None), None)
        assert torch.equal(s0.params["x"], before.params["x"])
        torch.manual_seed(0)
        u = t.init({"x": torch.zeros(2, dtype=torch.float64)})
        u = t.update(t.update(u, None, inplace=True), None, inplace=True)
        assert torch.equal(s.params["x"], u.params["x"]) and s.step == u.step == 2
        torch.testing.assert_close(vi.covariance(s), vi.covariance(u), atol=0, rtol=0)
