"""SG-MCMC against a known 2-D Gaussian posterior (many independent chains run as one tensor)."""
import copy

import pytest
import torch

from qbayes.bayes import schedules, sgmcmc
from qbayes.bayes.trace import Trace, predictive

MU = torch.tensor([1.0, -1.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
PREC = torch.linalg.inv(SIGMA)
CHAINS = 400


def log_post(params, batch):
    """Sum over chains of log N(x; MU, SIGMA); with `batch` = gradient-noise scale."""
    d = params["x"] - MU
    lp = -0.5 * torch.einsum("ci,ij,cj->", d, PREC, d)
    if batch:  # a noisy but unbiased gradient, as from mini-batches
        lp = lp + (params["x"] * batch * torch.randn_like(params["x"])).sum()
    return lp, None


def run(transform, steps, burn, noise=0.0, seed=0, init=None):
    torch.manual_seed(seed)
    state = transform.init({"x": torch.zeros(CHAINS, 2, dtype=torch.float64) if init is None else init})
    xs, ws, guides = [], [], []
    for t in range(steps):
        state = transform.update(state, noise, inplace=True)
        if t >= burn:
            xs.append(state.params["x"].clone())
            ws.append(state.extras.get("weight", 1.0))
            if "guide" in state.extras:
                guides.append(state.extras["guide"]["x"].clone())
    return state, xs, ws, guides


def moments(xs, ws=None):
    x = torch.stack(xs)  # (steps, chains, 2)
    w = torch.tensor(ws if ws else [1.0] * len(xs), dtype=torch.float64)
    w = (w / w.sum() / x.shape[1])[:, None].expand(x.shape[:2]).reshape(-1)
    x = x.reshape(-1, 2)
    mu = w @ x
    d = x - mu
    return mu, (d * w[:, None]).T @ d


@pytest.mark.parametrize("name,transform,steps", [
    ("sgld", sgmcmc.sgld(log_post, lr=0.01), 1500),
    ("sgld-noisy", sgmcmc.sgld(log_post, lr=0.01), 1500),
    ("psgld", sgmcmc.psgld(log_post, lr=0.02, beta=0.9999), 2000),
    ("sghmc", sgmcmc.sghmc(log_post, lr=0.05, alpha=1.0), 1500),
    ("sasgld", sgmcmc.sasgld(log_post, lr=0.01), 1500),
])
def test_samplers_recover_gaussian_moments(name, transform, steps):
    _, xs, ws, _ = run(transform, steps, burn=500, noise=0.3 if name.endswith("noisy") else 0.0)
    mu, cov = moments(xs, ws)
    assert torch.allclose(mu, MU, atol=0.1), mu
    assert torch.allclose(cov, SIGMA, atol=0.1), cov


def test_entropy_mcmc_marginals():
    eta = 0.5
    # the coupled chain relaxes slowly (slowest rate ~0.2 per unit time): long burn-in
    _, xs, _, guides = run(sgmcmc.entropy_mcmc(log_post, lr=0.02, eta=eta), 3000, burn=1500)
    mu, cov = moments(xs)
    mu_a, cov_a = moments(guides)
    assert torch.allclose(mu, MU, atol=0.1) and torch.allclose(cov, SIGMA, atol=0.12), cov
    # the guiding variable samples the posterior smoothed by N(0, eta I)
    assert torch.allclose(mu_a, MU, atol=0.1)
    assert torch.allclose(cov_a, SIGMA + eta * torch.eye(2, dtype=torch.float64), atol=0.15), cov_a


@pytest.mark.parametrize("transform", [
    sgmcmc.sgld(log_post, lr=0.01), sgmcmc.psgld(log_post, lr=0.01), sgmcmc.sghmc(log_post, lr=0.05),
    sgmcmc.sasgld(log_post, lr=0.01), sgmcmc.entropy_mcmc(log_post, lr=0.01),
])
def test_functional_and_inplace_updates_agree(transform):
    x0 = torch.randn(CHAINS, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    s = transform.init({"x": x0})
    s_before = copy.deepcopy(s)
    s1 = transform.update(s, 0.1, inplace=False)
    s2 = transform.update(s1, 0.1, inplace=False)
    assert torch.equal(s.params["x"], s_before.params["x"])  # functional update left its input alone
    torch.manual_seed(0)
    t = transform.init({"x": x0})
    t_obj = t
    t = transform.update(t, 0.1, inplace=True)
    t = transform.update(t, 0.1, inplace=True)
    assert t is t_obj and t.step == s2.step == 2
    assert torch.equal(s2.params["x"], t.params["x"])
    for k, v in s2.extras.items():
        if isinstance(v, dict):
            assert all(torch.equal(v[kk], t.extras[k][kk]) for kk in v)
        else:
            assert v == t.extras[k] or torch.equal(torch.as_tensor(v), torch.as_tensor(t.extras[k]))


def test_cyclical_schedule_shape():
    c = schedules.Cyclical(lr0=0.1, total_steps=100, n_cycles=4, explore=0.5)
    assert c.cycle_length == 25
    assert c.lr(0) == pytest.approx(0.1) and c.lr(25) == pytest.approx(0.1)
    assert c.lr(24) < 0.001 and c.lr(12) == pytest.approx(0.05 * (1 + torch.cos(torch.tensor(torch.pi * 12 / 25)).item()))
    assert not c.sampling(0) and not c.sampling(12) and c.sampling(13) and c.sampling(24) and not c.sampling(25)
    assert c.temperature(2.0)(5) == 0.0 and c.temperature(2.0)(20) == 2.0


def test_trace_burnin_thinning_and_cap():
    tr = Trace(burnin=3, thin=2, max_samples=2)
    from qbayes.bayes.base import State
    for step in range(1, 11):
        tr(State(params={"w": torch.tensor([float(step)])}, log_posterior=torch.tensor(0.0), step=step))
    # kept steps 5, 7, 9 -> capped to the last two
    assert [s["w"].item() for s in tr.samples] == [7.0, 9.0]
    assert tr.mean()["w"].item() == 8.0


def test_predictive_averages_probabilities():
    model = torch.nn.Linear(2, 3, bias=False)
    x = torch.randn(5, 2)
    s1 = {"weight": torch.zeros(3, 2)}
    s2 = {"weight": torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 0.0]])}
    p = predictive(model, [s1, s2], x)
    want = (torch.softmax(x @ s1["weight"].T, -1) + torch.softmax(x @ s2["weight"].T, -1)) / 2
    assert torch.allclose(p.float(), want, atol=1e-6)
