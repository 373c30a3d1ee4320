"""Bayes by Backprop layers and VBLL heads against closed forms."""

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence as torch_kl

from qbayes.bayes import bbb
from qbayes.bayes.vbll import VBLLClassification, VBLLNet, VBLLRegression


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_local_reparameterisation_matches_weight_sampling_moments():
    torch.manual_seed(0)
    layer = bbb.MeanFieldLinear(nn.Linear(3, 2), prior_std=1.0, init_sd=0.3)
    x = torch.randn(1, 3)
    outs = layer(x.expand(20000, 3))  # 20000 independent draws of the pre-activations
    sd_w, sd_b = nn.functional.softplus(layer.weight_rho), nn.functional.softplus(layer.bias_rho)
    mean = x @ layer.weight_mu.T + layer.bias_mu
    var = (x**2) @ (sd_w**2).T + sd_b**2
    torch.testing.assert_close(outs.mean(0), mean[0], atol=0.02, rtol=0)
    torch.testing.assert_close(outs.var(0), var[0], rtol=0.05, atol=0)


def test_conv_local_reparameterisation_moments():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    layer = bbb.MeanFieldConv2d(conv, init_sd=0.2)
    x = torch.randn(1, 2, 5, 5)
    sd = nn.functional.softplus(layer.weight_rho)
    # explicit weight sampling: output mean/var follow from independence of the weights
    samples = torch.stack([nn.functional.conv2d(x, layer.weight_mu + sd * torch.randn_like(sd), layer.bias_mu
                                                + nn.functional.softplus(layer.bias_rho) * torch.randn(3), padding=1)
                           for _ in range(4000)])
    mean, var = layer._mean_var(x)
    torch.testing.assert_close(samples.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(samples.var(0), var, rtol=0.1, atol=1e-3)


def test_kl_matches_torch_distributions():
    layer = bbb.MeanFieldLinear(nn.Linear(4, 3), prior_std=0.7, init_sd=0.2)
    want = sum(torch_kl(Normal(mu, nn.functional.softplus(rho)), Normal(0.0, 0.7)).sum()
               for mu, rho in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)))
    torch.testing.assert_close(layer.kl(), want)


def test_to_mean_field_means_reproduce_the_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    mf = bbb.to_mean_field(net)
    bbb.set_sampling(mf, False)
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(mf(x), net(x))
    bbb.set_sampling(mf, True)
    assert not torch.equal(mf(x), net(x))
    p = bbb.mc_predict(mf, x, 4)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="no Linear"):
        bbb.to_mean_field(nn.ReLU())


def test_vbll_regression_bound_is_tight_at_the_exact_posterior():
    """With fixed features and noise, the optimal VBLL posterior is Bayesian linear regression's."""
    g = torch.Generator().manual_seed(0)
    N, d, sigma, s = 60, 3, 0.4, 1.5
    Phi = torch.randn(N, d, generator=g)
    y = Phi @ torch.tensor([1.0, -2.0, 0.5]) + sigma * torch.randn(N, generator=g)
    head = VBLLRegression(d, 1, prior_scale=s, noise_std=sigma, learn_noise=False)
    net = VBLLNet(nn.Identity(), head)
    opt = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = net.loss(Phi, y, N)
        loss.backward()
        return loss
    for _ in range(5):
        opt.step(closure)
    A = torch.eye(d) / s**2 + Phi.T @ Phi / sigma**2
    S = torch.linalg.inv(A)
    m = S @ Phi.T @ y / sigma**2
    torch.testing.assert_close(head.W_mean[0].detach(), m, atol=1e-5, rtol=0)
    torch.testing.assert_close(head.S.detach(), S, atol=1e-5, rtol=0)
    mean, var = head.predict(Phi[:3])
    torch.testing.assert_close(var[:, 0].detach(), sigma**2 + torch.einsum("ni,ij,nj->n", Phi[:3], S, Phi[:3]), atol=1e-5, rtol=0)


def test_vbll_classification_bound_below_expected_log_likelihood():
    torch.manual_seed(0)
    head = VBLLClassification(4, 3, init_sd=0.5)
    phi, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    bound = -(head.loss(phi, y, n_data=10**12))  # KL term negligible
    W = head.W_mean + (torch.randn(20000, 3, 4) @ head.L.T)
    mc = torch.log_softmax(torch.einsum("skd,nd->snk", W, phi), -1).gather(2, y[None, :, None].expand(20000, 8, 1)).mean()
    assert bound.item() <= mc.item() + 1e-3
    p = head.predict(phi, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.sum(1), torch.ones(8))
