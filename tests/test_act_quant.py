"""Activation fake-quantization: log codes against their closed form, ActQuant against the affine
formula with the observer's range (static) or each row's range (dynamic per token), and input
quantizers on layers against quantizing the input by hand."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qbayes.errors import QBayesError
from qbayes.formats.log2 import log_decode, log_encode, log_fake_quantize
from qbayes.nn.act_quant import ActQuant, quantize_inputs
from qbayes.spec import ActSpec


@pytest.mark.parametrize("fmt,k", [("log2", 1), ("logsqrt2", 2)])
@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), scale=st.floats(1e-3, 10.0), seed=st.integers(0, 1000))
def test_log_codes_hit_powers_exactly_and_bound_the_relative_error(fmt, k, bits, scale, seed):
    top = 2 ** bits - 1
    s = torch.tensor(scale, dtype=torch.float64)
    levels = s * torch.exp2(-torch.arange(top, dtype=torch.float64) / k)
    assert torch.equal(log_fake_quantize(levels, s, bits, fmt), levels)  # every level is exact
    assert torch.equal(log_encode(levels, s, bits, fmt), torch.arange(top, dtype=torch.float64))
    assert float(log_decode(torch.tensor(float(top)), s, bits, fmt)) == 0.0
    g = torch.Generator().manual_seed(seed)
    x = s * torch.exp2(-torch.rand(500, generator=g, dtype=torch.float64) * (top - 1.5) / k)  # inside the range
    rel = ((log_fake_quantize(x, s, bits, fmt) - x).abs() / x).max()
    assert float(rel) <= 2 ** (1 / (2 * k)) - 1 + 1e-12
    assert float(log_fake_quantize(torch.tensor(0.0, dtype=torch.float64), s, bits, fmt)) == 0.0


def _affine(x, lo, hi, bits):
    s = (hi - lo) / (2 ** bits - 1)
    z = round(-lo / s)
    return (torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def test_static_per_tensor_uses_the_observed_range():
    g = torch.Generator().manual_seed(0)
    aq = ActQuant(ActSpec(bits=8))
    calib = [torch.randn(4, 16, generator=g) for _ in range(3)]
    for x in calib:
        assert torch.equal(aq(x), x)  # observing passes inputs through
    aq.freeze()
    lo, hi = float(torch.cat(calib).min()), float(torch.cat(calib).max())
    x = torch.randn(5, 16, generator=g) * 1.5
    assert torch.allclose(aq(x), _affine(x.double(), lo, hi, 8).float(), atol=1e-6)
    assert set(aq.state_dict()) == {"scale", "zero"}


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(1, 6), st.integers(2, 40), st.integers(0, 1000))
def test_dynamic_per_token_quantizes_each_row_with_its_own_range(bits, rows, cols, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    aq = ActQuant(ActSpec(bits=bits, granularity="per-token", dynamic=True))
    out = aq(x.float()).double()
    for r in range(rows):
        lo, hi = min(float(x[r].min()), 0.0), max(float(x[r].max()), 0.0)
        ref = _affine(x[r], lo, hi, bits)
        assert torch.allclose(out[r], ref, atol=1e-5 * max(1.0, hi - lo))
        assert float((out[r] - x[r]).abs().max()) <= (hi - lo) / (2 ** bits - 1) / 2 * (1 + 1e-5)


def test_per_channel_conv_inputs_and_straight_through_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, generator=g) * torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1)
    aq = ActQuant(ActSpec(bits=4, granularity="per-channel"), channel_axis=1)
    aq(x)
    aq.freeze()
    assert aq.scale.shape == (3,)
    out = aq(x)
    for c in range(3):
        xc = x[:, c].double()
        assert torch.allclose(out[:, c].double(), _affine(xc, min(float(xc.min()), 0), max(float(xc.max()), 0), 4),
                              atol=1e-5 * float(xc.abs().max()))
    xg = x.clone().requires_grad_()
    aq(xg).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))


def test_input_quantizers_on_layers_match_quantizing_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    ref = [m for m in model]
    qs = quantize_inputs(model, ["0", "3"], ActSpec(bits=6))
    calib = torch.randn(8, 1, 8, 8)
    model(calib)
    for q in qs.values():
        q.freeze()
    x = torch.randn(3, 1, 8, 8)
    h = ref[1](ref[0](qs["0"](x)))
    expect = ref[3](qs["3"](ref[2](h)))
    assert torch.equal(model(x), expect)
    assert "0.input_quant.scale" in model.state_dict()
    with pytest.raises(QBayesError, match="not a Linear or Conv2d"):
        quantize_inputs(model, ["1"], ActSpec())
    with pytest.raises(QBayesError, match="already has"):
        quantize_inputs(model, ["0"], ActSpec())
    with pytest.raises(QBayesError, match="not calibrated"):
        ActQuant(ActSpec()).params(x)


def test_log_quantizer_on_softmax_is_finer_than_uniform_at_low_bits():
    p = torch.softmax(torch.randn(64, 197, generator=torch.Generator().manual_seed(2)) * 3, -1)
    errs = {}
    for fmt in ("int", "log2", "logsqrt2"):
        aq = ActQuant(ActSpec(bits=4, format=fmt))
        aq(p)
        aq.freeze()
        errs[fmt] = float((aq(p) - p).square().sum(-1).mean())
    assert errs["logsqrt2"] < errs["int"] and math.isfinite(errs["log2"])


@torch.no_grad()
def test_quantize_activations_covers_layers_and_attention_points():
    from qbayes import quantize_activations_
    from qbayes.errors import CalibrationError
    from qbayes.models.vision import ViT

    torch.manual_seed(0)
    calib, x = torch.rand(32, 1, 8, 8), torch.rand(16, 1, 8, 8)

    def vit():
        torch.manual_seed(0)
        return ViT(image=8, patch=4, dim=16, depth=2, heads=2, mlp=32).eval()

    ref = vit()(x)
    errs = {}
    for bits in (8, 4):
        m = vit()
        soft = ActSpec(bits, format="logsqrt2") if bits < 8 else None  # log codes: ~19% steps at any width
        pts = quantize_activations_(m, ActSpec(bits), calib, matmuls=ActSpec(bits), softmax=soft, progress=False)
        assert {"blocks.0.attn.q_point", "blocks.1.attn.probs_point", "blocks.0.mlp.0", "head"} <= set(pts)
        assert "patch_embed" not in pts  # embeddings stay in float by default
        assert pts["blocks.0.attn.probs_point"].spec.format == ("logsqrt2" if bits < 8 else "int")
        assert all(q.calibrated for q in pts.values())
        errs[bits] = float((m(x) - ref).abs().max() / ref.abs().max())
    assert errs[8] < 0.02 < errs[4]  # 8 bits is close, 4 bits visibly worse
    m = vit()
    quantize_activations_(m, ActSpec(8, "per-token", dynamic=True), progress=False)  # dynamic: no calibration data
    assert float((m(x) - ref).abs().max() / ref.abs().max()) < 0.02
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    m.forward = lambda t: m[0](t)  # the second layer never runs
    with pytest.raises(CalibrationError, match="^1: .*saw no data"):
        quantize_activations_(m, ActSpec(), torch.randn(8, 4), progress=False)
