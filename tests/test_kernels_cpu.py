"""The packed-weight CPU kernel equals the reference dequantize-then-matmul to float32 rounding."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qbayes import QuantSpec
from qbayes.algorithms.rtn import rtn
from qbayes.kernels import cpu
from qbayes.nn import QuantLinear

pytestmark = pytest.mark.skipif(not cpu.available(), reason="CPU kernel not buildable here (no compiler or no AVX2)")


def _layer(bits, group, sym, K, N, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 3
    spec = QuantSpec(bits=bits, group_size=group, symmetric=sym, clip="minmax")
    return QuantLinear.from_quantized(rtn(W, None, spec), spec, bias=torch.randn(N, generator=g))


def _check(y, x, ql, bias=None):
    """|y - x Wᵀ| within float32 rounding of the kernel's sum s·(Σ c x − z Σ x): a few ulps of
    Σ |x| (|c| + z) s, i.e. of Σ |x| (|W + zs| + zs)."""
    from qbayes.kernels import dequantize_packed

    Wd = ql.dequantize().double()
    zs = -dequantize_packed(torch.zeros_like(ql.qweight), ql.scales, ql.qzeros, ql.spec.bits, ql.in_features,
                            ql.group_cols).double()  # z·s per weight
    ref = x.double() @ Wd.T + (0 if bias is None else bias.double())
    mag = x.double().abs() @ ((Wd + zs).abs() + zs.abs()).T
    bound = 8 * torch.finfo(torch.float32).eps * mag * x.shape[1] ** 0.5 + 1e-30
    assert ((y.double() - ref).abs() <= bound).all()


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), groups=st.integers(1, 4), gmul=st.integers(1, 4),
       N=st.integers(1, 40), M=st.integers(1, 20), seed=st.integers(0, 10_000), per_channel=st.booleans())
def test_kernel_matches_reference(bits, sym, groups, gmul, N, M, seed, per_channel):
    group = 32 * gmul
    K = group * groups
    ql = _layer(bits, -1 if per_channel else group, sym, K, N, seed)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1))
    with_bias = seed % 2 == 0
    y = cpu.qgemm(x, ql.qweight, ql.scales, ql.qzeros, bits, ql.group_cols, ql.bias if with_bias else None)
    _check(y, x, ql, ql.bias.float() if with_bias else None)


def test_quantlinear_dispatch_and_fallbacks():
    ql = _layer(4, 64, False, 256, 48, 0)
    Wd = ql.dequantize()
    x = torch.randn(2, 3, 256)
    with torch.no_grad():
        _check(ql(x).reshape(-1, 48), x.reshape(-1, 256), ql, ql.bias.float())
        big = torch.randn(64, 256)  # many rows: dequantized tiles x GEMM
        _check(ql(big), big, ql, ql.bias.float())
        for tile in (1, 7, 48, 100):
            _check(cpu.qgemm_tiled(big, ql.qweight, ql.scales, ql.qzeros, 4, 64, tile), big, ql)
    q3 = _layer(3, 64, True, 256, 40, 1)  # 3-bit codes straddle bytes: their own decode loop
    assert cpu.supports(3, 256, 64, torch.float16)
    for rows in (1, 5, 64):
        xr = torch.randn(rows, 256)
        _check(q3(xr), xr, q3, q3.bias.float())
    for tile in (7, 40):
        _check(cpu.qgemm_tiled(big, q3.qweight, q3.scales, q3.qzeros, 3, 64, tile), big, q3)
    q5 = _layer(5, 64, False, 256, 8, 1)  # 5-bit: not a kernel layout, reference path
    assert not cpu.supports(5, 256, 64, torch.float16)
    x1 = torch.randn(1, 256)
    torch.testing.assert_close(q5(x1), torch.nn.functional.linear(x1, q5.dequantize(), q5.bias.float()))
    # autograd through the input still works (reference path)
    xg = torch.randn(1, 256, requires_grad=True)
    ql(xg).sum().backward()
    torch.testing.assert_close(xg.grad, Wd.sum(0, keepdim=True))


def test_kernel_rejects_bad_layouts():
    ql = _layer(4, 64, False, 256, 8, 2)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        cpu.qgemm(torch.randn(1, 256, dtype=torch.float64), ql.qweight, ql.scales, ql.qzeros, 4, 64)
    with pytest.raises(RuntimeError, match="group size"):
        cpu.qgemm(torch.randn(1, 256), ql.qweight, ql.scales, ql.qzeros, 4, 24)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), groups=st.integers(1, 4), gmul=st.integers(1, 4),
       N=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_fast_dequantize_is_bit_identical(bits, sym, groups, gmul, N, seed):
    from qbayes.kernels import dequantize_packed

    group = (32 if bits == 3 else 8 * (8 // bits)) * gmul  # 3-bit: 32 codes fill 12 bytes
    ql = _layer(bits, group, sym, group * groups, N, seed)
    ref = dequantize_packed(ql.qweight, ql.scales, ql.qzeros, bits, ql.in_features, ql.group_cols)
    assert torch.equal(cpu.dequant(ql.qweight, ql.scales, ql.qzeros, bits, ql.in_features, ql.group_cols), ref)
    assert torch.equal(ql.dequantize(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_activations_use_the_kernel(dtype, monkeypatch):
    """bf16/fp16 rows on the CPU run the float32 kernel (not the slow reference dequantization):
    the result is the float32 product rounded once to the activation dtype."""
    ql = _layer(4, 64, False, 256, 48, 3)
    x = torch.randn(2, 256).to(dtype)
    ref = (x.double() @ ql.dequantize().double().T + ql.bias.double()).to(dtype)
    with torch.no_grad():
        y = ql(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref.double(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    monkeypatch.setattr(ql, "dequantize", lambda *a: (_ for _ in ()).throw(AssertionError("reference path used")))
    with torch.no_grad():
        ql(x)  # would raise if the reference path ran
