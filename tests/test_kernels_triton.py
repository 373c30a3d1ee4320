"""Triton kernels against the reference path: on a GPU when there is one, else on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1``, set here before Triton compiles anything)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qbayes import QuantSpec  # noqa: E402
from qbayes.formats import pack, packed_length  # noqa: E402
from qbayes.kernels import dequantize_packed  # noqa: E402
from qbayes.kernels import triton_kernels as tk  # noqa: E402
from qbayes.nn import QuantLinear  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

def _interpreter_consistent() -> bool:
    """Under the interpreter, Triton's own library functions must have been built interpreted too
    (TRITON_INTERPRET set before Triton was first imported: see conftest.py)."""
    if DEV == "cuda":
        return True
    import triton.language as tl
    return type(tl.zeros).__name__ != "JITFunction"


pytestmark = pytest.mark.skipif(not (tk.available() and _interpreter_consistent()),
                                reason="no CUDA device, and Triton's interpreter was not enabled before import")


def _packed(bits, N, K, gs, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = (torch.rand(N, K // gs, generator=g) * 0.1 + 1e-3).half()
    qzeros = None if symmetric else pack(torch.randint(0, 1 << bits, (N, K // gs), generator=g), bits)
    return pack(codes, bits), scales, qzeros


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([2, 3, 4, 5, 8]), n=st.integers(1, 70), kg=st.integers(1, 3),
       gs=st.sampled_from([8, 16, 32]), m=st.sampled_from([1, 2, 3, 5, 16, 19]), symmetric=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 10**6))
def test_triton_matches_reference(bits, n, kg, gs, m, symmetric, bias, seed):
    K = kg * gs * 2
    qw, sc, qz = _packed(bits, n, K, gs, symmetric, seed)
    assert qw.shape[1] == packed_length(K, bits)
    ref_w = dequantize_packed(qw, sc, qz, bits, K, gs)
    w = tk.dequant(qw.to(DEV), sc.to(DEV), None if qz is None else qz.to(DEV), bits, K, gs).cpu()
    assert torch.equal(w, ref_w)  # same float32 arithmetic: bit-identical
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(seed + 1))
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)) if bias else None
    y = tk.qlinear(x.to(DEV), qw.to(DEV), sc.to(DEV), None if qz is None else qz.to(DEV),
                   None if b is None else b.to(DEV), bits, K, gs).cpu()
    ref = (x.double() @ ref_w.double().T + (0 if b is None else b.double())).float()
    scale = (x.double().abs() @ ref_w.double().abs().T).max().item() + 1e-6
    assert (y - ref).abs().max().item() <= 1e-5 * scale


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 70), words=st.integers(1, 6),
       gs_words=st.sampled_from([1, 2]), m=st.sampled_from([1, 2, 3, 17]), symmetric=st.booleans(), bias=st.booleans(),
       block_n=st.sampled_from([16, 32]), block_w=st.sampled_from([1, 2, 4]), split=st.sampled_from([1, 2, 3, 4]),
       kind=st.sampled_from(["gemv", "dotw"]), seed=st.integers(0, 10**6))
def test_word_kernels_any_split_match_reference(bits, n, words, gs_words, m, symmetric, bias, block_n, block_w,
                                                split, kind, seed):
    """The word-reading kernels (gemv; dotw on the tensor cores), every tile and K split (split
    sums are added by the second kernel)."""
    per = 32 // bits
    gs = per * gs_words
    K = words * gs * 2
    qw, sc, qz = _packed(bits, n, K, gs, symmetric, seed)
    ref_w = dequantize_packed(qw, sc, qz, bits, K, gs)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(seed + 1))
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)) if bias else None
    if kind == "dotw":
        block_w *= 16  # tl.dot wants 16 or more words along K
        K = max(K, block_w * per)
        qw, sc, qz = _packed(bits, n, K, gs, symmetric, seed)
        ref_w = dequantize_packed(qw, sc, qz, bits, K, gs)
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(seed + 1))
    cfg = tk.Config(kind, block_n, block_w * per, split)
    y = tk.qlinear(x.to(DEV), qw.to(DEV), sc.to(DEV), None if qz is None else qz.to(DEV),
                   None if b is None else b.to(DEV), bits, K, gs, config=cfg).cpu()
    ref = (x.double() @ ref_w.double().T + (0 if b is None else b.double())).float()
    scale = (x.double().abs() @ ref_w.double().abs().T).max().item() + 1e-6
    assert y.shape == ref.shape and (y - ref).abs().max().item() <= 1e-5 * scale


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 70), gw=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 32]),
       groups=st.integers(1, 4), m=st.sampled_from([1, 2, 3]), symmetric=st.booleans(), bias=st.booleans(),
       block_n=st.sampled_from([16, 32]), split=st.integers(1, 6), unroll=st.sampled_from([1, 2]),
       seed=st.integers(0, 10**6))
def test_group_gemv_any_split_matches_reference(bits, n, gw, groups, m, symmetric, bias, block_n, split, unroll,
                                                seed):
    """gemvg: steps of up to 16 words within a group (any whole number of words per group, read 4
    at a time), codes turned into floats in place against reordered, power-of-two-scaled
    activations; K slices summed by the last one to finish. Equal to the float64 product to
    float32 rounding, and bit-identical when called again (the slice sums are added in a fixed
    order; the arrival counters reset themselves)."""
    gs = gw * 32 // bits
    K = gs * groups
    qw, sc, qz = _packed(bits, n, K, gs, symmetric, seed)
    ref_w = dequantize_packed(qw, sc, qz, bits, K, gs)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(seed + 1))
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)) if bias else None
    cfg = tk.Config("gemvg", block_n, gs, split, 4, unroll)  # num_stages: groups per loop step
    args = (x.to(DEV), qw.to(DEV), sc.to(DEV), None if qz is None else qz.to(DEV), None if b is None else b.to(DEV),
            bits, K, gs)
    y = tk.qlinear(*args, config=cfg).cpu()
    ref = (x.double() @ ref_w.double().T + (0 if b is None else b.double())).float()
    scale = (x.double().abs() @ ref_w.double().abs().T).max().item() + 1e-6
    assert y.shape == ref.shape and (y - ref).abs().max().item() <= 1e-5 * scale
    assert torch.equal(tk.qlinear(*args, config=cfg).cpu(), y)


def test_group_gemv_half_activations_per_channel_and_refusal():
    """bf16/fp16 activations: float32 arithmetic, one rounding to the output dtype; one scale per
    row (per-channel: a 512-code group stepped 16 words at a time); 3-bit codes, which straddle
    words, refused by name."""
    qw, sc, qz = _packed(4, 24, 256, 64, False, 5)
    ref_w = dequantize_packed(qw, sc, qz, 4, 256, 64)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(6))
    for dt in (torch.float16, torch.bfloat16):
        xd = x[:, :256].to(dt)
        y = tk.qlinear(xd.to(DEV), qw.to(DEV), sc.to(DEV), qz.to(DEV), None, 4, 256, 64,
                       config=tk.Config("gemvg", 32, 64, 3)).cpu()
        ref = xd.double() @ ref_w.double().T
        assert y.dtype == dt
        assert torch.allclose(y.double(), ref, rtol=2 * torch.finfo(dt).eps, atol=1e-6)
    qw, sc, qz = _packed(4, 40, 512, 512, True, 7)
    ref_w = dequantize_packed(qw, sc, qz, 4, 512, 512)
    for split in (1, 3):
        y = tk.qlinear(x.to(DEV), qw.to(DEV), sc.to(DEV), None, None, 4, 512, 512,
                       config=tk.Config("gemvg", 32, 0, split)).cpu()
        ref = x.double() @ ref_w.double().T
        assert (y - ref).abs().max().item() <= 1e-5 * (x.double().abs() @ ref_w.double().abs().T).max().item()
    qw3, sc3, qz3 = _packed(3, 8, 64, 32, False, 0)
    with pytest.raises(ValueError, match="gemvg kernel needs"):
        tk.qlinear(x[:, :64].to(DEV), qw3.to(DEV), sc3.to(DEV), qz3.to(DEV), None, 3, 64, 32,
                   config=tk.Config("gemvg", 16, 32))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([3, 4, 5, 8]), n=st.integers(1, 40), kg=st.integers(1, 4), m=st.sampled_from([1, 4, 17]),
       split=st.sampled_from([1, 2, 3]), bias=st.booleans(), seed=st.integers(0, 10**6))
def test_dot_kernel_any_split_matches_reference(bits, n, kg, m, split, bias, seed):
    gs = 16
    K = kg * gs * 2
    qw, sc, qz = _packed(bits, n, K, gs, False, seed)
    ref_w = dequantize_packed(qw, sc, qz, bits, K, gs)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(seed + 1))
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)) if bias else None
    y = tk.qlinear(x.to(DEV), qw.to(DEV), sc.to(DEV), qz.to(DEV), None if b is None else b.to(DEV), bits, K, gs,
                   config=tk.Config("dot", 16, 16, split)).cpu()
    ref = (x.double() @ ref_w.double().T + (0 if b is None else b.double())).float()
    scale = (x.double().abs() @ ref_w.double().abs().T).max().item() + 1e-6
    assert (y - ref).abs().max().item() <= 1e-5 * scale


def test_gemv_in_half_dtypes_and_layout_refusal():
    qw, sc, qz = _packed(4, 40, 256, 64, False, 3)
    ref_w = dequantize_packed(qw, sc, qz, 4, 256, 64)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(4))
    for dt in (torch.float16, torch.bfloat16):
        xd = x.to(dt)
        y = tk.qlinear(xd.to(DEV), qw.to(DEV), sc.to(DEV), qz.to(DEV), None, 4, 256, 64,
                       config=tk.Config("gemv", 16, 64, 2)).cpu()
        ref = xd.double() @ ref_w.double().T  # float32 accumulation, one rounding to the output dtype
        assert y.dtype == dt
        assert torch.allclose(y.double(), ref, rtol=2 * torch.finfo(dt).eps, atol=1e-6)
    qw3, sc3, qz3 = _packed(3, 8, 64, 32, False, 0)
    with pytest.raises(ValueError, match="whole words"):
        tk.qlinear(x[:, :64].to(DEV), qw3.to(DEV), sc3.to(DEV), qz3.to(DEV), None, 3, 64, 32,
                   config=tk.Config("gemv", 16, 32))


def test_triton_dequant_in_half_dtypes():
    qw, sc, qz = _packed(4, 48, 128, 32, False, 0)
    ref = dequantize_packed(qw, sc, qz, 4, 128, 32)
    for dt in (torch.float16, torch.bfloat16):
        w = tk.dequant(qw.to(DEV), sc.to(DEV), qz.to(DEV), 4, 128, 32, dt).cpu()
        assert w.dtype == dt and torch.equal(w, ref.to(dt))  # one rounding of the exact float32 value


def test_quantlinear_dispatches_to_triton_on_cuda():
    if DEV != "cuda":
        pytest.skip("the CUDA dispatch needs a GPU")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    from qbayes.algorithms import rtn
    spec = QuantSpec(bits=4, group_size=64)
    q = QuantLinear.from_quantized(rtn(lin.weight.data, None, spec), spec, lin.bias.data).cuda()
    for m in (1, 7, 300):
        x = torch.randn(m, 256, device="cuda")
        ref = torch.nn.functional.linear(x.double(), q.dequantize().double(), q.bias.double()).float()
        assert (q(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_bad_layouts_are_refused():
    qw, sc, qz = _packed(4, 8, 64, 32, True, 0)
    with pytest.raises(ValueError, match="bit-width"):
        tk.dequant(qw, sc, qz, 9, 64, 32)
    with pytest.raises(ValueError, match="group size"):
        tk.dequant(qw, sc, qz, 4, 64, 48)


def test_gpu_bench_harness_runs():
    """The GPU speed table's harness (CUDA graphs, L2-defeating weight copies) on a tiny shape:
    rows carry the fields of bench/results/kernels.json and a float64 error check."""
    from qbayes.benchmarks.kernels_gpu import run_cuda, table_cuda

    rows = run_cuda([(128, 96)], (4,), (1, 20), rounds=1, min_ms=0.2, cache_bytes=5e4, verbose=False)
    assert [r["batch"] for r in rows] == [1, 20]
    for r in rows:
        assert {"device", "bits", "group_size", "K", "N", "batch", "ms", "bf16_ms", "speedup_vs_bf16"} <= set(r)
        assert r["ms"] > 0 and r["rel_err_vs_float64"] < 1e-2  # bf16 output
        assert r["weight_copies"][1] >= 2
    assert table_cuda(rows).count("\n") == 3
