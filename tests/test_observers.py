"""Activation observers against closed forms: running min/max and moving averages by their
recursions, the histogram against a direct count, percentiles against torch.quantile, the MSE
range against the exact expected error of a Gaussian, and the entropy threshold's behaviour."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbayes.errors import CalibrationError, QBayesError
from qbayes.observers import Histogram, act_params, make_observer
from qbayes.spec import ActSpec


def _batches(seed, n, scales):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 6, generator=g, dtype=torch.float64) * s + s / 3 for s in scales]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=5), st.booleans())
def test_minmax_is_the_min_and_max_of_everything_seen(seed, scales, per_channel):
    spec = ActSpec(granularity="per-channel" if per_channel else "per-tensor")
    obs = make_observer(spec, channel_axis=-1)
    xs = _batches(seed, 7, scales)
    for x in xs:
        obs.update(x)
    lo, hi = obs.range()
    allx = torch.cat(xs)
    ref_lo, ref_hi = (allx.amin(0), allx.amax(0)) if per_channel else (allx.min(), allx.max())
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


def test_moving_average_follows_its_recursion_in_closed_form():
    obs = make_observer(ActSpec(observer="ema"))
    c = obs.momentum
    mins = [-1.0, -3.0, -2.0, -5.0]
    for m in mins:
        obs.update(torch.tensor([m, 1.0], dtype=torch.float64))
    T = len(mins)
    ref = (1 - c) ** (T - 1) * mins[0] + sum(c * (1 - c) ** (T - t) * mins[t - 1] for t in range(2, T + 1))
    assert float(obs.range()[0]) == pytest.approx(ref, rel=1e-12)
    assert float(obs.range()[1]) == pytest.approx(1.0, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.floats(1e-4, 1e4), min_size=1, max_size=6),
       st.floats(-1e3, 1e3), st.integers(16, 512))
def test_histogram_equals_a_direct_count_at_its_final_grid(seed, scales, shift, bins):
    obs = Histogram(ActSpec(observer="percentile"), bins=bins)
    xs = [x.flatten() + shift for x in _batches(seed, 5, scales)]
    for x in xs:
        obs.update(x)
    allx = torch.cat(xs)
    idx = torch.floor(allx / obs.w).long() - obs.k0
    assert int(idx.min()) >= 0 and int(idx.max()) < bins  # every value lies inside the window
    assert torch.equal(obs.counts, torch.bincount(idx, minlength=bins).double())
    assert math.log2(obs.w) == int(math.log2(obs.w))  # the width stays a power of two


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_is_the_order_statistic_within_a_bin(p):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(20_000, generator=g, dtype=torch.float64) * s for s in (1.0, 2.0, 0.5)]
    obs = make_observer(ActSpec(observer="percentile", percentile=p))
    for x in xs:
        obs.update(x)
    lo, hi = obs.range()
    srt = torch.cat(xs).sort().values
    n = len(srt)
    # the sample of rank ceil(q n) lies in the bin the estimate interpolates in
    assert float(hi) == pytest.approx(float(srt[math.ceil(p / 100 * n) - 1]), abs=obs.w)
    assert float(lo) == pytest.approx(float(srt[math.ceil((1 - p / 100) * n) - 1]), abs=obs.w)


def _gaussian_expected_mse(alpha: float, bits: int) -> float:
    """E (x - q(x))^2 for x ~ N(0, 1) and the symmetric grid of max alpha: uniform noise inside,
    exact tail integrals outside (lower end one level further out, as the codes are asymmetric)."""
    s = alpha / (2 ** (bits - 1) - 1)
    lo_end = 2 ** (bits - 1) * s

    def tail(c):  # ∫_c^∞ (x - c)^2 φ(x) dx
        sf = 0.5 * math.erfc(c / math.sqrt(2))
        return (1 + c * c) * sf - c * math.exp(-c * c / 2) / math.sqrt(2 * math.pi)

    inside = 1 - 0.5 * math.erfc(alpha / math.sqrt(2)) - 0.5 * math.erfc(lo_end / math.sqrt(2))
    return tail(alpha) + tail(lo_end) + s * s / 12 * inside


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_mse_range_is_the_gaussian_optimum(bits):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    obs = make_observer(ActSpec(bits=bits, observer="mse", symmetric=True))
    obs.update(x)
    lo, hi = obs.range()
    grid = [0.5 + i * 0.001 for i in range(6000)]
    alpha = min(grid, key=lambda a: _gaussian_expected_mse(a, bits))
    assert float(hi) == pytest.approx(alpha, rel=0.04)
    # and the chosen range really quantizes these samples better than min-max
    spec = ActSpec(bits=bits, symmetric=True)
    from qbayes.formats import fake_quantize

    def err(a, b):
        s, z = act_params(a, b, spec)
        return float((fake_quantize(x.float(), s, z, bits) - x.float()).square().mean())
    assert err(lo, hi) < err(x.min(), x.max())


def test_mse_keeps_the_whole_range_of_uniform_data():
    x = torch.rand(500_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    obs = make_observer(ActSpec(bits=8, observer="mse"))
    obs.update(x)
    lo, hi = obs.range()
    assert float(lo) == 0.0 and float(hi) >= 0.98 * float(x.max())


def test_entropy_clips_rare_outliers_and_keeps_uniform_ranges():
    g = torch.Generator().manual_seed(3)
    u = torch.rand(400_000, generator=g, dtype=torch.float64)
    obs = make_observer(ActSpec(observer="entropy"))
    obs.update(u)
    assert float(obs.range()[1]) >= 0.9 * float(u.max())
    x = torch.cat([torch.randn(400_000, generator=g, dtype=torch.float64), torch.tensor([200.0, -150.0])])
    obs = make_observer(ActSpec(observer="entropy"))
    obs.update(x)
    lo, hi = obs.range()
    assert 2.0 < float(hi) < 40.0 and -40.0 < float(lo) < -2.0  # the lone outliers are clipped


def test_observer_errors_name_the_problem():
    obs = make_observer(ActSpec())
    with pytest.raises(CalibrationError, match="saw no data"):
        obs.range()
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        obs.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(QBayesError, match="non-negative"):
        make_observer(ActSpec(format="log2")).update(torch.tensor([-0.1, 0.5]))
    for bad, match in [(dict(granularity="per-token"), "dynamic=True"), (dict(dynamic=True, observer="mse"), "static"),
                       (dict(observer="entropy", granularity="per-channel"), "per-tensor"), (dict(bits=9), "bit-width"),
                       (dict(format="log2", symmetric=True), "per-tensor"), (dict(observer="kl"), "observer")]:
        with pytest.raises(QBayesError, match=match):
            ActSpec(**bad)
