"""NoisyQuant: the noisy bias is removed exactly (the float function is kept when the rounding is
switched off), the noisy quantizer's error stays within half a step inside the range, the
searched noise lowers the output error of post-GELU heavy-tailed inputs (checked on held-out
data against a float64 Monte-Carlo estimate), the search is reproducible from its seed and never
worse than no noise on its sample, and bad inputs are refused. (The checkpoint round trip is in
tests/test_act_checkpoint.py.)"""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import qbayes.nn.act_quant as act_quant_module
from qbayes import ActSpec, QuantSpec, quantize_, quantize_activations_
from qbayes.errors import CalibrationError, QBayesError
from qbayes.nn.act_quant import ActQuant, quantize_inputs
from qbayes.transforms.noisyquant import add_noisy_bias, denoising_bias, noise_for, uniform_draw

GELU_MIN = -0.16997120747990244  # GELU(-0.7517916): where its negative lobe piles up


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.GELU(), nn.Linear(32, 5)).eval()


def _set_noise(net, points, k=2.0, seed=0):
    for name, q in points.items():
        layer = net.get_submodule(name)
        channels = layer.in_channels if hasattr(layer, "in_channels") else layer.in_features
        q.noise = noise_for(q, uniform_draw(channels, seed, name), k)


@pytest.mark.parametrize("aspec,smooth", [(ActSpec(4), None), (ActSpec(4), 0.5), (ActSpec(6, "per-channel"), None)])
def test_noise_is_removed_exactly_when_rounding_is_off(monkeypatch, aspec, smooth):
    ref, net = _net(), _net()
    calib = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    points = quantize_activations_(net, aspec, [calib], smoothquant=smooth, exclude=(), progress=False)
    _set_noise(net, points)
    assert all(q.noise is not None and float(q.noise.abs().max()) > 0 for q in points.values())
    seen = []

    def identity(x, s, z, bits):  # the rounding switched off: Q = identity
        seen.append(x.clone())
        return x

    monkeypatch.setattr(act_quant_module, "fake_quantize", identity)
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref(x), net(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # ...and the quantizer was handed x + N (channel 1 of the first conv's input)
    assert torch.allclose(seen[0], x + points["0"].noise.view(1, -1, 1, 1), atol=1e-6)


def test_folded_denoising_bias_is_the_same_layer():
    torch.manual_seed(3)
    lin, conv = nn.Linear(12, 7), nn.Conv2d(4, 6, 3, groups=2)  # no padding: the fold is exact
    x2, x4 = torch.randn(64, 12) * 2, torch.randn(8, 4, 5, 5) * 2
    for layer, x in ((lin, x2), (conv, x4)):
        (q,) = quantize_inputs(nn.Sequential(layer), ["0"], ActSpec(4)).values()
        with torch.no_grad():
            layer(x)
            q.freeze()
            q.noise = noise_for(q, uniform_draw(x.shape[1], 0, "l"), 1.5)
            want = layer(x)  # through the quantizer: layer(Q(x + N) - N)
            noisy = act_quant_module.fake_quantize(x + q._channel_view(q.noise, x), q.scale, q.zero, 4)
            b = layer.bias + denoising_bias(layer).float()
            got = F.linear(noisy, layer.weight, b) if layer is lin else F.conv2d(noisy, layer.weight, b, groups=2)
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), per_channel=st.booleans(), k=st.sampled_from([0.5, 1.0, 2.0]),
       seed=st.integers(0, 1000))
def test_noisy_quantizer_error_is_at_most_half_a_step_inside_the_range(bits, symmetric, per_channel, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g, dtype=torch.float64).float() * (torch.rand(10, generator=g) * 3 + 0.1)
    q = ActQuant(ActSpec(bits, "per-channel" if per_channel else "per-tensor", symmetric=symmetric))
    q(x)
    q.freeze()
    q.noise = noise_for(q, uniform_draw(10, seed, "x"), k)
    xn = x.double() + q.noise.double()
    s, z = q.scale.double(), q.zero.double()
    inside = (xn >= s * (0 - z)) & (xn <= s * (2 ** bits - 1 - z))
    err = (q(x).double() - x.double()).abs()
    step = s.expand(10)
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-6)[inside].all())
    assert not torch.equal(q(x), x)  # it did quantize


def test_straight_through_gradient_and_observing_the_noisy_input():
    q = ActQuant(ActSpec(8))
    x = torch.randn(16, 5, requires_grad=True)
    q.noise = torch.linspace(-0.3, 0.3, 5)
    out = q(x)  # still observing: the input passes through, the observer sees x + N
    assert torch.equal(out, x)
    lo, hi = q.observer.range()
    xn = x.detach() + q.noise
    assert float(lo) == pytest.approx(float(xn.min()), abs=1e-6) and float(hi) == pytest.approx(float(xn.max()), abs=1e-6)
    q.freeze()
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _post_gelu(n, g, channels=64, top=None):
    """GELU of Laplace pre-activations (heavy-tailed, with GELU's lobe at -0.17), with channel 0 an
    outlier channel uniform in [0, top] that sets the range (as a ViT's massive channels do)."""
    z = torch.distributions.Laplace(0.0, 1.0).sample((n, channels))
    x = F.gelu(z)
    x[:, 0] = torch.rand(n, generator=g) * top
    x[0, 0] = top
    return x


def _quant64(x, s, z, bits):
    """The affine activation quantizer in float64, written out independently of qbayes."""
    return (torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def test_searched_noise_lowers_the_output_error_of_post_gelu_inputs():
    # 8-bit per-tensor ranges; the outlier channel's top puts GELU's lobe 0.6 steps past a grid
    # point (-GELU_MIN / Δ = 2.6), i.e. inside a bin, where NoisyQuant's noise helps.
    bits, top = 8, -GELU_MIN * 255 / 2.6 + GELU_MIN
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 48)
    net = nn.Sequential(lin)
    (q,) = quantize_inputs(net, ["0"], ActSpec(bits)).values()
    calib = _post_gelu(4096, g, top=top)
    report = add_noisy_bias({"0": lin}, lambda: net(calib), rows=2048)["0"]
    assert -GELU_MIN / float(q.scale) == pytest.approx(2.6, abs=0.01)
    assert report["k"] > 0 and q.noise is not None
    assert report["error"] < 0.95 * report["error_without"]
    assert report["amplitude"] == pytest.approx(report["k"] * float(q.scale))
    # held-out float64 Monte Carlo of the same quantity, E ||(x̂ - x) Wᵀ||² per row
    x = _post_gelu(200_000, g, top=top).double()
    w, s, z, n = lin.weight.detach().double(), float(q.scale), float(q.zero), q.noise.double()
    with_noise = ((_quant64(x + n, s, z, bits) - n - x) @ w.T).pow(2).sum(1)
    without = ((_quant64(x, s, z, bits) - x) @ w.T).pow(2).sum(1)
    diff = with_noise - without
    assert float(diff.mean()) < -10 * float(diff.std()) / len(diff) ** 0.5  # lower, far beyond MC noise
    mc_ratio = float(with_noise.mean() / without.mean())
    assert mc_ratio < 0.95
    assert report["error"] / report["error_without"] == pytest.approx(mc_ratio, abs=0.03)
    with torch.no_grad():  # ActQuant computes the same quantity as the float64 reference
        assert float(((q(x[:4096].float()).double() - x[:4096]) @ w.T).pow(2).sum(1).mean()) == pytest.approx(
            float(with_noise[:4096].mean()), rel=1e-3)


def test_search_is_reproducible_and_never_worse_than_no_noise():
    def run(seed):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
        points = quantize_inputs(net, ["0", "2"], ActSpec(4, symmetric=True))
        calib = torch.distributions.Laplace(0.0, 1.0).sample((512, 16))
        report = add_noisy_bias({"0": net[0], "2": net[2]}, lambda: net(calib), seed=seed, grid=(0.5, 1.0, 2.0))
        return report, {n: (q.noise, q.scale) for n, q in points.items()}

    r1, n1 = run(0)
    r2, n2 = run(0)
    assert r1 == r2
    for name in n1:
        assert (n1[name][0] is None and n2[name][0] is None) or torch.equal(n1[name][0], n2[name][0])
        assert torch.equal(n1[name][1], n2[name][1])  # uncalibrated quantizers were frozen by the search
    assert all(r["error"] <= r["error_without"] for r in r1.values())
    assert all(r["k"] in (0.0, 0.5, 1.0, 2.0) for r in r1.values())
    assert not torch.equal(uniform_draw(16, 0, "0"), uniform_draw(16, 1, "0"))
    assert not torch.equal(uniform_draw(16, 0, "0"), uniform_draw(16, 0, "2"))
    assert torch.equal(uniform_draw(16, 3, "0"), uniform_draw(16, 3, "0"))


def test_search_on_packed_convolutions_measures_the_convolved_error():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 6, 3, groups=2)).eval()
    calib = F.gelu(torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 2)
    points = quantize_activations_(net, ActSpec(4), [calib], exclude=(), progress=False)
    quantize_(net, QuantSpec(4, -1, symmetric=True, scale_dtype="float32"), "rtn", convs=True, exclude=(),
              progress=False)
    report = add_noisy_bias({"0": net[0], "2": net[2]}, lambda: net(calib), rows=10**6)  # keeps every image
    assert set(report) == {"0", "2"} and all(r["error"] <= r["error_without"] for r in report.values())
    q, conv = points["0"], net[0]
    with torch.no_grad():
        saved, q.noise = q.noise, None
        d = q(calib) - calib
        q.noise = saved
        want = F.conv2d(d, conv.dequantize(), None, conv.stride, conv.padding).double().pow(2).sum()
    assert report["0"]["error_without"] == pytest.approx(float(want), rel=1e-5)


def test_bad_inputs_are_refused():
    def layer(spec):
        lin = nn.Linear(8, 4)
        quantize_inputs(nn.Sequential(lin), ["0"], spec)
        return lin

    x = torch.rand(32, 8)
    run = lambda lin: (lambda: lin(x))
    log = layer(ActSpec(4, format="log2"))
    with pytest.raises(QBayesError, match="integer codes"):
        add_noisy_bias({"l": log}, run(log))
    dyn = layer(ActSpec(8, "per-token", dynamic=True))
    with pytest.raises(QBayesError, match="dynamic"):
        add_noisy_bias({"l": dyn}, run(dyn))
    with pytest.raises(QBayesError, match="input quantizer"):
        add_noisy_bias({"l": nn.Linear(8, 4)}, lambda: None)
    with pytest.raises(QBayesError, match="no layers"):
        add_noisy_bias({}, lambda: None)
    ok = layer(ActSpec(8))
    for kwargs, match in (({"grid": (0.5, -1.0)}, "non-negative"), ({"grid": (float("nan"),)}, "non-negative"),
                          ({"grid": ("a",)}, "numbers"), ({"seed": 1.5}, "seed"), ({"rows": 0}, "rows")):
        with pytest.raises(QBayesError, match=match):
            add_noisy_bias({"l": ok}, run(ok), **kwargs)
    with pytest.raises(CalibrationError, match="no calibration input reached"):
        add_noisy_bias({"l": ok}, lambda: None)
    q = ActQuant(ActSpec(4, format="log2"))
    q.noise = torch.zeros(8)
    with pytest.raises(QBayesError, match="integer activation codes"):
        q(x)
    with pytest.raises(QBayesError, match="carries no NoisyQuant noise"):
        denoising_bias(copy.deepcopy(ok))


# ---------------------------------------------------------------- through the front door and the exporter
def _gelu_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8)).eval()


def _calib():
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(5))
    x[:, 3] *= 12  # an outlier channel that widens the first layer's range
    return x


def test_quantize_activations_noisyquant_is_reproducible_and_recorded():
    a, b = _gelu_mlp(), _gelu_mlp()
    for m in (a, b):
        quantize_activations_(m, ActSpec(4), _calib(), noisyquant=True, noisyquant_seed=3, progress=False)
    assert set(a.qbayes_activations["noisyquant"]) == {"0", "2"}
    for n in ("0", "2"):
        qa, qb = a.get_submodule(n).input_quant, b.get_submodule(n).input_quant
        assert (qa.noise is None) == (qb.noise is None)
        if qa.noise is not None:
            assert torch.equal(qa.noise, qb.noise)
    x = _calib()[:32]
    assert torch.equal(a(x), b(x))
    with pytest.raises(QBayesError, match="static integer range"):
        quantize_activations_(_gelu_mlp(), ActSpec(8, "per-token", dynamic=True), _calib(), noisyquant=True,
                              progress=False)


def test_qdq_export_keeps_the_noise(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from qbayes.export.onnx_qdq import check_qdq, compare_codes, export_qdq

    model = _gelu_mlp()
    quantize_activations_(model, ActSpec(8), _calib(), progress=False)
    for n, val in (("0", 0.3), ("2", -0.2)):  # a known noise on both quantizers
        q = model.get_submodule(n).input_quant
        q.noise = torch.full((model.get_submodule(n).in_features,), val) * q.scale
    quantize_(model, QuantSpec(8, -1, symmetric=True, scale_dtype="float32"), "rtn", float_dtype="float32",
              progress=False)
    x = _calib()[:64]
    plain = _gelu_mlp()
    quantize_activations_(plain, ActSpec(8), _calib(), progress=False)
    assert not torch.equal(model(x), plain(x))  # the noise changes which codes are hit
    path = tmp_path / "noisy.onnx"
    export_qdq(model, x[:2], path)
    assert check_qdq(path, model, x) < 1e-5
    assert all(c["rule_mismatches"] == 0 for c in compare_codes(path, model, x).values())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_int8_execution_keeps_the_noise(backend):
    """to_int8_ on a noisy model equals its fake-quant forward (codes of x + N, N's response removed,
    zero padding of the convolutions included), and dropping the noise would not."""
    net = _net()
    calib = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    points = quantize_activations_(net, ActSpec(8), [calib], exclude=(), progress=False)
    quantize_(net, QuantSpec(8, -1, symmetric=True, scale_dtype="float32"), "rtn", convs=True, exclude=(),
              progress=False)
    _set_noise(net, points, k=0.5)
    from qbayes.nn import to_int8_
    i8 = copy.deepcopy(net)
    rep = to_int8_(i8, backend=backend, conv_channels_last=False)
    assert set(rep["converted"]) == set(points) and not rep["left"]
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = net(x), i8(x)
        for q in points.values():
            q.noise = None
        plain = net(x)
    scale = float(want.abs().max())
    assert torch.allclose(got, want, atol=1e-4 * scale)
    assert float((plain - want).abs().max()) > 100 * float((got - want).abs().max())
