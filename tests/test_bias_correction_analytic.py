"""Analytic bias correction: the closed-form means of ReLU / ReLU6 / clipped normals against
numerical integration and Monte Carlo (float64); on nets whose BatchNorm outputs are exactly
N(β, γ²) by construction, the analytic correction matches the empirical one (correct_bias on many
samples) within their Monte-Carlo error and removes the output-mean error; models without a
BatchNorm chain, and mismatched inputs, are refused."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from torch import nn
from torch.nn import functional as F

from qbayes import QuantSpec, quantize_
from qbayes.errors import QBayesError
from qbayes.transforms import correct_bias, correct_bias_analytic, expected_inputs, fold_batchnorm
from qbayes.transforms.bias_correction_analytic import clipped_mean, relu_mean


def _integral(f, mu, sd, breaks):
    pdf = lambda y: math.exp(-0.5 * ((y - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))  # noqa: E731
    edges = sorted({mu - 14 * sd, mu + 14 * sd, *(b for b in breaks if abs(b - mu) < 14 * sd)})
    return sum(integrate.quad(lambda y: f(y) * pdf(y), a, b, epsabs=1e-13, epsrel=1e-12, limit=200)[0]
               for a, b in zip(edges, edges[1:]))


@settings(max_examples=60, deadline=None)
@given(beta=st.floats(-8, 8), gamma=st.floats(0.02, 5), sign=st.sampled_from([1.0, -1.0]))
def test_closed_form_means_match_numerical_integration(beta, gamma, sign):
    g = sign * gamma  # a negative BN weight gives the same distribution
    want_relu = _integral(lambda y: max(y, 0.0), beta, gamma, [0.0])
    want_relu6 = _integral(lambda y: min(max(y, 0.0), 6.0), beta, gamma, [0.0, 6.0])
    want_clip = _integral(lambda y: min(max(y, -1.5), 2.0), beta, gamma, [-1.5, 2.0])
    b, g = torch.tensor(beta, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
    assert float(relu_mean(b, g)) == pytest.approx(want_relu, rel=1e-8, abs=1e-10)
    assert float(clipped_mean(b, g, 0.0, 6.0)) == pytest.approx(want_relu6, rel=1e-8, abs=1e-10)
    assert float(clipped_mean(b, g, -1.5, 2.0)) == pytest.approx(want_clip, rel=1e-8, abs=1e-10)


def test_closed_form_means_match_monte_carlo_and_the_degenerate_case():
    g = torch.Generator().manual_seed(0)
    beta, gamma = torch.tensor([-1.0, 0.3, 2.0, 5.5]), torch.tensor([0.5, 1.0, 2.0, 1.5])
    y = beta.double() + gamma.double() * torch.randn(1_000_000, 4, generator=g, dtype=torch.float64)
    for f, got in ((F.relu, relu_mean(beta, gamma)), (F.relu6, clipped_mean(beta, gamma, 0.0, 6.0))):
        v = f(y)
        se = v.std(0) / len(v) ** 0.5
        assert bool(((v.mean(0) - got).abs() < 5 * se).all())
    assert torch.equal(relu_mean(torch.tensor([-1.0, 2.0]), torch.zeros(2)), torch.tensor([0.0, 2.0], dtype=torch.float64))
    lo, hi = torch.tensor([0.0, -1.0]), torch.tensor([1.0, 3.0])  # per-channel bounds (a ChannelClip)
    assert torch.allclose(clipped_mean(torch.tensor([5.0, -9.0]), torch.tensor([1e-3, 1e-3]), lo, hi),
                          torch.tensor([1.0, -1.0], dtype=torch.float64))


def _conv_net(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), *([act] if act else []), nn.Conv2d(8, 6, 3))


def _mlp_net(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), *([act] if act else []), nn.Linear(12, 5))


def _gaussian_bn(net):
    """BN running statistics set to the true moments of the first layer's output on N(0, I) inputs:
    each output is N(b_c, ||W_c||²) exactly (no padding), so the BN output is exactly N(β, γ²)."""
    first, bn = net[0], net[1]
    with torch.no_grad():
        w = first.weight.reshape(first.weight.shape[0], -1)
        bn.running_mean.copy_(first.bias)
        bn.running_var.copy_(w.pow(2).sum(1) - bn.eps)
        bn.weight.uniform_(0.5, 3.0)
        bn.bias.uniform_(-1.0, 4.0)
        net[-1].bias.uniform_(-0.1, 0.1)  # small, so its float16 storage rounds finely
    return net.eval()


def _inputs(net, n, seed):
    shape = (n, 3, 7, 7) if isinstance(net[0], nn.Conv2d) else (n, 16)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("build", [_conv_net, _mlp_net])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), None], ids=["relu", "relu6", "none"])
def test_analytic_correction_matches_the_empirical_one(build, act):
    net = _gaussian_bn(build(act))
    last = str(len(net) - 1)
    ex = expected_inputs(net)  # before folding
    assert list(ex) == [last] and ex.skipped == ["0"]
    reference = copy.deepcopy(net)
    assert fold_batchnorm(reference) == ["1"]
    before = quantize_(copy.deepcopy(reference), QuantSpec(3, 0, symmetric=True, clip="minmax", scale_dtype="float32"),
                       "rtn", include=[last], convs=True, float_dtype="float32", progress=False)
    quantized, empirical = copy.deepcopy(before), copy.deepcopy(before)
    x = _inputs(net, 4096, 1)
    correct_bias(empirical, reference, x.split(512), names=[last], progress=False)
    shifts = correct_bias_analytic(quantized, reference, ex)
    assert set(shifts) == {last} and shifts[last] > 0.01

    # the empirical shift is a mean over the 4096 (independent) inputs: its standard error, from the
    # spread of the per-input mean shifts; the biases are float16 (half an ulp each)
    q, f = quantized.get_submodule(last), reference.get_submodule(last)
    eps = q.dequantize(torch.float32) - f.weight.detach()
    with torch.no_grad():
        h = reference[:-1](x)
        d = F.conv2d(h, eps) if h.dim() == 4 else h @ eps.T
        per_input = d.mean((2, 3)) if d.dim() == 4 else d
    se = per_input.double().std(0) / len(per_input) ** 0.5
    b_a = (q.packed.bias if hasattr(q, "packed") else q.bias).double()
    e = empirical.get_submodule(last)
    b_e = (e.packed.bias if hasattr(e, "packed") else e.bias).double()
    ulp = 2.0 ** (torch.floor(torch.log2(torch.maximum(b_a.abs(), b_e.abs()))) - 10)
    assert bool(((b_a - b_e).abs() <= 5 * se + ulp).all()), ((b_a - b_e).abs(), 5 * se + ulp)

    # the analytic correction removes the output-mean error (fresh inputs)
    xt = _inputs(net, 4096, 2)
    with torch.no_grad():
        dims = (0, 2, 3) if xt.dim() == 4 else (0,)
        err_before = (before(xt) - reference(xt)).mean(dims).abs().max()
        err_after = (quantized(xt) - reference(xt)).mean(dims).abs().max()
    assert float(err_after) < 0.1 * float(err_before)


def test_models_without_batchnorm_chains_and_bad_inputs_are_refused():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    with pytest.raises(QBayesError, match="reads a BatchNorm"):
        expected_inputs(plain)
    net = _gaussian_bn(_conv_net(nn.ReLU()))
    folded = copy.deepcopy(net)
    fold_batchnorm(folded)
    with pytest.raises(QBayesError, match="before fold_batchnorm"):
        expected_inputs(folded)
    ex = expected_inputs(net)
    with pytest.raises(QBayesError, match="no expected inputs"):
        correct_bias_analytic(folded, folded, {})
    with pytest.raises(QBayesError, match="not a linear/conv layer"):
        correct_bias_analytic(folded, folded, {"1": ex["3"]})
    with pytest.raises(QBayesError, match="input means"):
        correct_bias_analytic(folded, folded, {"3": ex["3"][:5]})


def test_the_recipe_runner_reads_the_means_before_folding_and_corrects_after():
    from qbayes.transforms.pipeline import run_recipe

    spec = QuantSpec(3, 0, symmetric=True, clip="minmax", scale_dtype="float32")
    by_hand = _gaussian_bn(_conv_net(nn.ReLU()))
    expected = expected_inputs(by_hand)
    fold_batchnorm(by_hand)
    reference = copy.deepcopy(by_hand)
    quantize_(by_hand, spec, "rtn", convs=True, float_dtype="float32", progress=False)
    correct_bias_analytic(by_hand, reference, expected)

    recipe = _gaussian_bn(_conv_net(nn.ReLU()))
    run_recipe(recipe, ["bnfold", "biascorr-analytic"], None,
               lambda: quantize_(recipe, spec, "rtn", convs=True, float_dtype="float32", progress=False))
    x = torch.randn(4, 3, 9, 9)
    assert torch.equal(recipe(x), by_hand(x))
    with pytest.raises(QBayesError, match="use biascorr"):
        run_recipe(_gaussian_bn(_conv_net(nn.ReLU())), ["bnfold", "cle", "biascorr-analytic"], None, lambda: None)
