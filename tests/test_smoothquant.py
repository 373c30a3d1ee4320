"""SmoothQuant: the scale's closed form (α = 1/2 balances the activation and weight maxima), the
rewrite keeps the float function, and on inputs with an outlier channel it cuts the quantized
layer's output error by a large factor, per-tensor and per-token."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qbayes import ActSpec, QuantSpec, quantize_, quantize_activations_
from qbayes.errors import QBayesError
from qbayes.transforms.smoothquant import output_error, search_alpha, smooth_linears, smoothing_scale


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
def test_scale_closed_form_and_balance(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(16, generator=g, dtype=torch.float64) * 50 + 0.01
    w = torch.rand(16, generator=g, dtype=torch.float64) + 0.01
    s = smoothing_scale(a, w, alpha).double()
    torch.testing.assert_close(s, (a ** alpha / w ** (1 - alpha)).float().double(), rtol=1e-6, atol=0)
    if alpha == 0.5:  # the smoothed maxima meet at sqrt(a w)
        torch.testing.assert_close(a / s, w * s, rtol=1e-5, atol=0)
    assert torch.equal(smoothing_scale(a, w, None), torch.ones(16, dtype=torch.float64))


def test_dead_channels_keep_scale_one():
    s = smoothing_scale(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), 0.5)
    assert torch.equal(s, torch.ones(2))


def _outlier_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 3] *= 60.0  # one channel carries outliers, as in LLM activations
    x[:, 17] *= 25.0
    return x


@pytest.mark.parametrize("granularity,dynamic", [("per-tensor", False), ("per-token", True)])
def test_search_cuts_output_error_on_outlier_channels(granularity, dynamic):
    x = _outlier_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    spec = ActSpec(8, granularity=granularity, dynamic=dynamic)
    alpha, s = search_alpha(x, w, x.abs().amax(0), spec, 8)
    assert alpha is not None
    plain = output_error(x, w, torch.ones(64), spec, 8)
    assert output_error(x, w, s, spec, 8) < plain / 5


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 8))


@torch.no_grad()
def test_rewrite_preserves_the_float_function():
    model, x = _mlp(), _outlier_inputs(256)
    ref = model(x)
    layers = {"0": model[0], "2": model[2]}
    res = smooth_linears(layers, lambda: model(x), ActSpec(8), "search")
    handles = [layers[n].register_forward_pre_hook(lambda m, a, inv=r["inv_scale"]: (a[0] * inv,))
               for n, r in res.items()]
    out = model(torch.cat([x, _outlier_inputs(64, seed=5)]))[:256]
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_quantize_activations_with_smoothquant_is_more_accurate():
    base, calib, held_out = _mlp(), list(_outlier_inputs(512).split(64)), _outlier_inputs(256, seed=9)
    ref = base(held_out)
    errs = {}
    for sq in (None, "search", 0.5):
        m = copy.deepcopy(base)
        quantize_activations_(m, ActSpec(8), calib, smoothquant=sq, progress=False)
        quantize_(m, QuantSpec(bits=8, group_size=-1, symmetric=True), "rtn", calib, progress=False)
        errs[sq] = float((m(held_out) - ref).pow(2).mean())
    assert errs["search"] < errs[None] / 3
    assert m.qbayes_activations["smoothquant"] == {"0": 0.5, "2": 0.5}


def test_smoothquant_refuses_packed_layers_and_bad_alpha():
    m, calib = _mlp(), [_outlier_inputs(64)]
    with pytest.raises(QBayesError, match="alpha"):
        quantize_activations_(copy.deepcopy(m), ActSpec(8), calib, smoothquant=1.5, progress=False)
    quantize_(m, QuantSpec(bits=8, group_size=-1), "rtn", calib, progress=False)
    with pytest.raises(QBayesError, match="before quantize_"):
        quantize_activations_(m, ActSpec(8), calib, smoothquant="search", progress=False)


def test_rewrite_pipeline_preserves_function_and_names_errors():
    from qbayes.transforms.pipeline import apply_rewrites

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        assert apply_rewrites(net, ["bnfold", "cle", "biascorr", "absorb"], x) == ["bnfold", "cle", "absorb"]
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(QBayesError, match="unknown rewrite"):
        apply_rewrites(net, ["rotate"])
    with pytest.raises(QBayesError, match="calibration data"):
        apply_rewrites(net, ["absorb"])
