"""Laplace against closed forms: Bayesian linear regression (Bishop 2006, §3.3-3.5) and the GGN."""
import math

import pytest
import torch
from torch import nn

from qbayes.bayes.laplace import Laplace
from qbayes.curvature import ggn_batch



@pytest.fixture(autouse=True)
def _float64():
    """Every tensor in these tests is float64 (restored afterwards: no leak into other tests)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def blr_problem(N=50, M=4, alpha=2.0, sigma=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Phi = torch.randn(N, M, generator=g, dtype=torch.float64)
    w = torch.randn(M, generator=g, dtype=torch.float64)
    t = Phi @ w + sigma * torch.randn(N, generator=g, dtype=torch.float64)
    beta = 1 / sigma**2
    A = alpha * torch.eye(M) + beta * Phi.T @ Phi           # Bishop 3.54 (S_N^-1)
    S = torch.linalg.inv(A)
    m = beta * S @ Phi.T @ t                                # 3.53
    E = beta / 2 * ((t - Phi @ m) ** 2).sum() + alpha / 2 * m @ m   # 3.82
    log_ev = M / 2 * math.log(alpha) + N / 2 * math.log(beta) - E - 0.5 * torch.logdet(A) - N / 2 * math.log(2 * math.pi)  # 3.86
    return Phi, t, m, S, float(log_ev)


def linear_model(m):
    model = nn.Linear(m.numel(), 1, bias=False).double()
    model.weight.data = m.reshape(1, -1).clone()
    return model


def loader(X, y, bs=16):
    return [(X[i:i + bs], y[i:i + bs]) for i in range(0, len(X), bs)]


@pytest.mark.parametrize("subset,structure", [("all", "full"), ("all", "kron"), ("last_layer", "full"), ("last_layer", "kron")])
def test_bayesian_linear_regression_closed_form(subset, structure):
    alpha, sigma = 2.0, 0.5
    Phi, t, m, S, log_ev = blr_problem(alpha=alpha, sigma=sigma)
    la = Laplace(linear_model(m), "regression", subset=subset, structure=structure,
                 prior_precision=alpha, sigma_noise=sigma).fit(loader(Phi, t))
    torch.testing.assert_close(la.mean, m, atol=1e-12, rtol=0)
    torch.testing.assert_close(la.posterior_covariance, S, atol=1e-6, rtol=0)
    assert abs(la.log_marginal_likelihood().item() - log_ev) < 1e-6
    # predictive: mean phi^T m, variance sigma^2 + phi^T S phi (Bishop 3.58-3.59)
    mean, var = la.predictive(Phi[:5])
    torch.testing.assert_close(mean.squeeze(-1), Phi[:5] @ m)
    torch.testing.assert_close(var.squeeze(-1), sigma**2 + torch.einsum("ni,ij,nj->n", Phi[:5], S, Phi[:5]))


def test_diag_equals_full_for_orthogonal_design():
    N, M = 40, 4
    Q, _ = torch.linalg.qr(torch.randn(N, M, generator=torch.Generator().manual_seed(1)))
    Phi = Q * torch.tensor([3.0, 2.0, 1.0, 0.5])  # Phi^T Phi diagonal
    t = Phi @ torch.ones(M)
    model = linear_model(torch.ones(M))
    full = Laplace(model, "regression", structure="full", prior_precision=1.5, sigma_noise=0.3).fit(loader(Phi, t))
    diag = Laplace(model, "regression", structure="diag", prior_precision=1.5, sigma_noise=0.3).fit(loader(Phi, t))
    torch.testing.assert_close(diag.posterior_covariance, full.posterior_covariance, atol=1e-10, rtol=0)
    assert abs(diag.log_marginal_likelihood().item() - full.log_marginal_likelihood().item()) < 1e-8


def test_prior_precision_tuning_maximises_the_evidence():
    Phi, t, m, S, _ = blr_problem()
    la = Laplace(linear_model(m), "regression", structure="full", prior_precision=1.0, sigma_noise=0.5).fit(loader(Phi, t))
    la.optimize_prior_precision(steps=600, lr=0.05, tune_sigma=False)
    grid = torch.logspace(-3, 3, 4001)
    best = grid[torch.stack([la.log_marginal_likelihood(g) for g in grid]).argmax()]
    assert abs(math.log(la.prior_precision) - math.log(best)) < 0.01


def softmax_mlp(seed=0, d=3, h=5, C=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C)).double()


def test_ggn_of_softmax_regression_closed_form():
    """For f = W x (no hidden layer) the GGN is sum_i (diag p_i - p_i p_iᵀ) ⊗ x_i x_iᵀ."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4, bias=False).double()
    X = torch.randn(7, 3)
    p = {"weight": model.weight.detach()}
    fn = lambda q, x: torch.func.functional_call(model, q, (x.unsqueeze(0),)).squeeze(0)
    G = ggn_batch(fn, p, X, "classification", "full")
    probs = torch.softmax(X @ model.weight.T, -1)
    want = sum(torch.kron(torch.diag(pi) - torch.outer(pi, pi), torch.outer(x, x)) for pi, x in zip(probs, X))
    torch.testing.assert_close(G, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(ggn_batch(fn, p, X, "classification", "diag"), torch.diagonal(want), atol=1e-12, rtol=0)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_kron_is_exact_for_one_sample_and_diag_is_the_diagonal(subset):
    model = softmax_mlp()
    X, y = torch.randn(1, 3), torch.tensor([2])
    kw = dict(subset=subset, prior_precision=0.7)
    full = Laplace(model, "classification", structure="full", **kw).fit([(X, y)])
    kron = Laplace(model, "classification", structure="kron", **kw).fit([(X, y)])
    diag = Laplace(model, "classification", structure="diag", **kw).fit([(X, y)])
    # one sample: sum_c g_c g_cᵀ ⊗ a aᵀ is exactly that sample's layer block, so the
    # block-diagonal K-FAC equals the full GGN restricted to within-layer blocks
    Cf, Ck = full.posterior_covariance, kron.posterior_covariance
    if subset == "last_layer":
        torch.testing.assert_close(Ck, Cf, atol=1e-10, rtol=0)
    Pf = torch.linalg.inv(Cf)
    torch.testing.assert_close(torch.diag(torch.linalg.inv(diag.posterior_covariance)), torch.diag(Pf), atol=1e-10, rtol=0)
    torch.testing.assert_close(kron.mean, full.mean)


def test_empirical_fisher_is_sum_of_gradient_outer_products():
    model = softmax_mlp(1)
    X, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    la = Laplace(model, "classification", structure="full", fisher="ef", prior_precision=1.0).fit([(X, y)])
    grads = []
    for xi, yi in zip(X, y):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    G = torch.stack(grads)
    want = torch.linalg.inv(G.T @ G + torch.eye(G.shape[1]))
    torch.testing.assert_close(la.posterior_covariance, want, atol=1e-8, rtol=1e-8)


def test_classification_predictives():
    model = softmax_mlp(2)
    X = torch.randn(64, 3)
    y = model(X).argmax(1)
    x = torch.randn(10, 3) * 3
    p_map = torch.softmax(model(x), -1)
    la = Laplace(model, "classification", structure="kron", prior_precision=1.0).fit(loader(X, y))
    g = lambda s: torch.Generator().manual_seed(s)
    p_probit = la.predictive(x)
    p_mc = la.predictive(x, link_approx="mc", n_samples=20000, generator=g(0))
    torch.testing.assert_close(p_probit.sum(1), torch.ones(10))
    assert (p_probit.max(1).values <= p_map.max(1).values + 1e-12).all()  # probit only tempers
    # Monte Carlo converges (two seeds agree) and the probit approximation stays close to it
    assert (la.predictive(x, link_approx="mc", n_samples=20000, generator=g(1)) - p_mc).abs().max() < 0.02
    assert (p_mc - p_probit).abs().max() < 0.1
    # a sharp posterior collapses every predictive onto the MAP
    la.prior_precision = 1e8
    for p in (la.predictive(x), la.predictive(x, link_approx="mc", generator=g(2)),
              la.predictive(x, pred_type="nn", n_samples=50, generator=g(3))):
        assert (p - p_map).abs().max() < 1e-3


def test_errors():
    from qbayes.errors import QBayesError
    model = softmax_mlp()
    with pytest.raises(QBayesError, match="likelihood"):
        Laplace(model, "poisson")
    with pytest.raises(QBayesError, match="structure"):
        Laplace(model, "classification", structure="block")
    with pytest.raises(QBayesError, match="fit"):
        Laplace(model, "classification").sample(2)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(QBayesError, match="sigma_noise must be a positive"):
            Laplace(model, "regression", sigma_noise=bad)
    with pytest.raises(QBayesError, match="prior_precision must be a positive"):
        Laplace(model, "classification", prior_precision=float("inf"))
    with pytest.raises(QBayesError, match="empty"):
        Laplace(model, "classification", structure="diag").fit([])
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    with pytest.raises(QBayesError, match="nn.Linear layers only"):
        Laplace(conv, "classification", structure="kron").fit([(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]))])


def test_mc_fisher_is_an_unbiased_ggn_estimate():
    from qbayes.curvature import mc_fisher_batch
    model = softmax_mlp(4)
    X = torch.randn(5, 3)
    p = {k: v.detach() for k, v in model.named_parameters()}
    fn = lambda q, x: torch.func.functional_call(model, q, (x.unsqueeze(0),)).squeeze(0)
    g = torch.Generator().manual_seed(0)
    est = sum(mc_fisher_batch(fn, p, X, "classification", "diag", g) for _ in range(4000)) / 4000
    exact = ggn_batch(fn, p, X, "classification", "diag")
    assert ((est - exact).abs() <= 0.05 * exact.abs().max()).all()


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_fit_reads_a_one_shot_generator_once(structure):
    """Regression: the K-FAC fit read its loader twice (log-likelihood, then factors) and crashed
    with UnboundLocalError on a generator. Fitting from one must equal fitting from a list."""
    alpha, sigma = 2.0, 0.5
    Phi, t, m, S, log_ev = blr_problem(alpha=alpha, sigma=sigma)
    ref = Laplace(linear_model(m), "regression", structure=structure, prior_precision=alpha,
                  sigma_noise=sigma).fit(loader(Phi, t))
    la = Laplace(linear_model(m), "regression", structure=structure, prior_precision=alpha,
                 sigma_noise=sigma).fit(b for b in loader(Phi, t))
    assert la.n_data == len(Phi)
    torch.testing.assert_close(la.posterior_covariance, ref.posterior_covariance, atol=1e-12, rtol=0)
    assert abs(la.log_marginal_likelihood().item() - log_ev) < 1e-6


def test_kron_factors_with_a_bias_stay_on_the_model_device():
    """Regression: the bias column of K-FAC's input factor was made on the CPU whatever the
    device; on the meta device (no GPU needed) any cross-device tensor is an error."""
    from qbayes.curvature import collect
    from qbayes.models import adapter_for

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to("meta")
    x, y = torch.empty(5, 3, device="meta"), torch.empty(5, dtype=torch.long, device="meta")
    col = collect(adapter_for(model), {"0": model[0], "2": model[2]}, [(x, y)], want=("H", "G"), bias_column=True,
                  fisher="ef")
    assert col["0"].H.shape == (4, 4) and col["0"].H.device.type == "meta"
    assert col["2"].G.shape == (2, 2)
