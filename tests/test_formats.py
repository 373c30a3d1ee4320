"""Property tests for the integer formats, range selection and bit packing."""
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from qbayes.formats import (PER_CHANNEL, PER_TENSOR, dequantize, group_view, max_code, pack, packed_length,
                            params_from_range, quantize, round_scale_up, unpack)
from qbayes.ranges import minmax_params, mse_params
from qbayes.spec import QuantSpec

settings.register_profile("qbayes", max_examples=60, deadline=None)
settings.load_profile("qbayes")


@st.composite
def matrices(draw):
    rows = draw(st.integers(1, 6))
    ngroups = draw(st.integers(1, 4))
    g = draw(st.sampled_from([1, 2, 3, 8, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    shift = draw(st.sampled_from([0.0, 0.5, -2.0]))
    w = (torch.randn(rows, ngroups * g, generator=torch.Generator().manual_seed(seed)) + shift) * scale
    return w, g


@given(matrices(), st.integers(2, 8), st.booleans(), st.sampled_from(["group", PER_CHANNEL, PER_TENSOR]),
       st.sampled_from(["float16", "float32"]))
def test_roundtrip_error_within_half_step(wg, bits, symmetric, gran, scale_dtype):
    w, g = wg
    group = g if gran == "group" else gran
    spec = QuantSpec(bits, group, symmetric, clip="minmax", scale_dtype=scale_dtype)
    grouped = group_view(w, group)
    s, z = minmax_params(grouped, spec)
    c = quantize(grouped, s.unsqueeze(-1), z.unsqueeze(-1), bits)
    assert int(c.min()) >= 0 and int(c.max()) <= max_code(bits)
    if symmetric:
        assert torch.all(z == 2 ** (bits - 1))
    else:
        assert torch.all(z == z.round()) and int(z.min()) >= 0 and int(z.max()) <= max_code(bits)
    # scales are representable in the storage dtype
    assert torch.equal(s.to(spec.torch_scale_dtype).float(), s)
    err = (dequantize(c, s.unsqueeze(-1), z.unsqueeze(-1)) - grouped).abs()
    bound = s.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-6 * grouped.abs()
    assert torch.all(err <= bound)


@given(st.floats(1e-7, 1e4), st.sampled_from([torch.float16, torch.bfloat16]))
def test_round_scale_up_is_smallest_representable_not_below(x, dtype):
    s = torch.tensor([x], dtype=torch.float32)
    r = round_scale_up(s, dtype)
    assert r.item() >= x * (1 - 1e-7) or r.item() == torch.finfo(dtype).tiny
    assert torch.equal(r.to(dtype).float(), r)
    below = torch.nextafter(r.to(dtype), torch.tensor(0.0, dtype=dtype)).float()
    assert below.item() < x or r.item() == torch.finfo(dtype).tiny


def test_zero_range_group_is_exact():
    w = torch.zeros(3, 8)
    for sym in (False, True):
        s, z = params_from_range(w.amin(-1), w.amax(-1), 4, sym)
        assert torch.all(s > 0)
        c = quantize(w, s.unsqueeze(-1), z.unsqueeze(-1), 4)
        assert torch.equal(dequantize(c, s.unsqueeze(-1), z.unsqueeze(-1)), w)


@given(matrices(), st.integers(2, 8), st.booleans())
def test_mse_search_never_worse_than_minmax(wg, bits, symmetric):
    w, g = wg
    spec = QuantSpec(bits, g, symmetric, clip="mse")
    grouped = group_view(w, g)

    def err(s, z):
        c = quantize(grouped, s.unsqueeze(-1), z.unsqueeze(-1), bits)
        return ((dequantize(c, s.unsqueeze(-1), z.unsqueeze(-1)) - grouped).abs() ** 2.4).sum(-1)

    e_mse = err(*mse_params(grouped, spec))
    e_mm = err(*minmax_params(grouped, spec))
    assert torch.all(e_mse <= e_mm * (1 + 1e-5) + 1e-12)


@given(st.integers(1, 8), st.integers(0, 4), st.integers(0, 70), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_size_is_bits_per_code(bits):
    n = 8 * 24  # a multiple of every chunk size
    assert packed_length(n, bits) * 8 == n * bits
    assert packed_length(1, 3) == 3 and packed_length(8, 3) == 3 and packed_length(9, 3) == 6


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[0, 16]]), 4)
    with pytest.raises(ValueError, match="1..8"):
        pack(torch.tensor([[0]]), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 4)


def test_group_view_refuses_non_divisor():
    with pytest.raises(ValueError, match="does not divide"):
        group_view(torch.zeros(2, 10), 4)


def test_asymmetric_2bit_levels_closed_form():
    # range [-1, 2] at 2 bits: s = 1, z = 1, grid {-1, 0, 1, 2}
    w = torch.tensor([[-1.0, 0.2, 0.6, 2.0]])
    s, z = params_from_range(w.amin(-1), w.amax(-1), 2, False, None)
    assert s.item() == 1.0 and z.item() == 1.0
    c = quantize(w, s.unsqueeze(-1), z.unsqueeze(-1), 2)
    assert c.tolist() == [[0, 1, 2, 3]]
    assert dequantize(c, s.unsqueeze(-1), z.unsqueeze(-1)).tolist() == [[-1.0, 0.0, 1.0, 2.0]]
    assert math.isclose(s.item(), 1.0)
