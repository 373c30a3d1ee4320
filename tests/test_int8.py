"""Integer W8A8 execution: the int8 GEMM/conv backends give the integer reference's int32
accumulators exactly (hypothesis over shapes, zero-points and worst-case operands), the integer
requantization is bit-exact against its stated rounding rule, and Int8Linear / Int8Conv2d equal
the fake-quant modules (QuantLinear / QuantConv2d + ActQuant) to float rounding."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from qbayes.algorithms.rtn import rtn
from qbayes.errors import KernelError, QBayesError
from qbayes.formats import fake_quantize
from qbayes.kernels import int8 as k8
from qbayes.kernels import int8_quantize as q8
from qbayes.nn import Int8Conv2d, Int8Linear, QuantConv2d, QuantLinear, to_int8_
from qbayes.nn.act_quant import ActQuant, attach_input_quant, calibrate_input_quant
from qbayes.spec import ActSpec, QuantSpec

W8 = QuantSpec(bits=8, group_size=-1, symmetric=True, clip="minmax", scale_dtype="float32")
SETTINGS = settings(max_examples=12, deadline=None)
needs_ops = pytest.mark.skipif(not q8.available(), reason="the fused int8 ops could not be built here")


def _operands(g, m, k, n, extreme):
    """Codes and weights: uniform, or the worst case for int16-saturating kernels (0/255 × ±127/−128)."""
    if extreme:
        c = torch.randint(0, 2, (m, k), generator=g).to(torch.uint8) * 255
        w = torch.where(torch.randint(0, 2, (n, k), generator=g).bool(), 127, -128).to(torch.int8)
    else:
        c = torch.randint(0, 256, (m, k), generator=g).to(torch.uint8)
        w = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
    return c, w


def _ref_acc(c, z, w):
    """Σ_k (c − z) w, elementwise in int64 (independent of the kernels' reference)."""
    z = torch.as_tensor(z, dtype=torch.int64).reshape(-1, 1, 1) if torch.as_tensor(z).numel() > 1 else int(z)
    return ((c.long()[:, None, :] - z) * w.long()[None]).sum(-1)


@SETTINGS
@given(m=st.integers(1, 40), k8_=st.integers(1, 40), n8=st.integers(1, 6), per_row=st.booleans(),
       extreme=st.booleans(), seed=st.integers(0, 10_000))
def test_int_mm_and_reference_accumulators_are_exact(m, k8_, n8, per_row, extreme, seed):
    g = torch.Generator().manual_seed(seed)
    k, n = 8 * k8_, 8 * n8
    c, w = _operands(g, m, k, n, extreme)
    z = torch.randint(0, 256, (m,) if per_row else (), generator=g)
    ref = _ref_acc(c, z, w)
    assert torch.equal(k8.int_mm_reference(c, z, w).long(), ref)
    got = k8.int_mm(c, z, w.t().contiguous(), k8.weight_colsum(w))  # _int_mm when m > 16, else the reference
    assert got.dtype == torch.int32 and torch.equal(got.long(), ref)


@pytest.mark.skipif(not k8.exact("fbgemm"), reason="fbgemm is missing or not exact on this CPU (AVX2 without "
                    "VNNI saturates u8*s8 pairs in int16), so pick_backend never uses it here")
@SETTINGS
@given(m=st.integers(1, 33), k=st.integers(1, 512), n=st.integers(1, 40), extreme=st.booleans(),
       seed=st.integers(0, 10_000))
def test_fbgemm_accumulators_are_exact(m, k, n, extreme, seed):
    # unit scales and K <= 512 keep |A| < 2^24, so fbgemm's float32 output holds the accumulator exactly
    g = torch.Generator().manual_seed(seed)
    c, w = _operands(g, m, k, n, extreme)
    z = int(torch.randint(0, 256, (), generator=g))
    y = k8.fbgemm_linear(c.float() - z, z, k8.fbgemm_prepack(w, torch.ones(n)))
    assert torch.equal(y.round().long(), _ref_acc(c, z, w)) and torch.equal(y, y.round())


@pytest.mark.skipif(not k8.exact("onednn"), reason="oneDNN int8 is missing or not exact on this CPU, so "
                    "pick_backend never uses it here")
@SETTINGS
@given(m=st.integers(1, 33), k=st.integers(1, 512), n=st.integers(1, 40), extreme=st.booleans(),
       seed=st.integers(0, 10_000))
def test_onednn_linear_accumulators_are_exact(m, k, n, extreme, seed):
    g = torch.Generator().manual_seed(seed)
    c, w = _operands(g, m, k, n, extreme)
    z = int(torch.randint(0, 256, (), generator=g))
    y = k8.onednn_linear(c, 1.0, z, k8.onednn_linear_prepack(w), torch.ones(n), None)
    assert torch.equal(y.round().long(), _ref_acc(c, z, w)) and torch.equal(y, y.round())


@SETTINGS
@given(m=st.integers(1, 9), k=st.integers(1, 70), bits=st.integers(2, 8), per_row=st.booleans(),
       pow2=st.booleans(), seed=st.integers(0, 10_000))
def test_quantize_codes_are_the_quantizers_codes_including_ties(m, k, bits, per_row, pow2, seed):
    g = torch.Generator().manual_seed(seed)
    top = 2 ** bits - 1
    s = torch.full((m, 1) if per_row else (), 2.0 ** -5) if pow2 else torch.rand((m, 1) if per_row else (), generator=g) + 0.01
    z = torch.randint(0, top + 1, (m, 1) if per_row else (), generator=g).float()
    halves = torch.randint(-2 * top, 2 * top, (m, k), generator=g) + 0.5  # exact ties x/s = j + 1/2 when s = 2^-5
    x = halves * s if pow2 else torch.randn(m, k, generator=g) * top * s / 2
    want = torch.clamp(torch.round(x / s) + z, 0, top)  # the ActQuant / formats.int_affine rule
    got = k8.quantize_codes(x, s, z, bits)
    assert got.dtype == torch.uint8 and not got.is_quantized and torch.equal(got.float(), want)


def test_quantize_codes_fallback_without_torch_quantize(monkeypatch):
    def gone(*a, **k):
        raise RuntimeError("quantized tensors removed")

    x, s = torch.randn(6, 50) * 3, torch.rand(6, 1) + 0.01
    z = torch.randint(0, 256, (6, 1)).float()
    fast = [k8.quantize_codes(x, s, z), k8.quantize_codes(x, s[0, 0], z[0, 0], 5)]
    monkeypatch.setattr(torch, "quantize_per_tensor", gone)
    assert torch.equal(k8.quantize_codes(x, s, z), fast[0]) and torch.equal(k8.quantize_codes(x, s[0, 0], z[0, 0], 5), fast[1])


@needs_ops
@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 100), bits=st.integers(2, 8), symmetric=st.booleans(),
       gran=st.sampled_from(["per-token", "per-tensor", "static"]), smooth=st.booleans(), shift=st.booleans(),
       seed=st.integers(0, 10_000))
def test_fused_codes_are_the_quantizers_bit_for_bit(m, k, bits, symmetric, gran, smooth, shift, seed):
    # random magnitudes; non-negative, constant (incl. 0) rows; exact ties (range [-4, 191/16]: s = 2^-4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * float(10 ** (torch.rand((), generator=g) * 6 - 3))
    x[::3], x[1::4], x[2::5] = x[::3].abs(), float(torch.randn((), generator=g)), 0.0
    if k >= 3:
        x[3::4] = torch.cat([torch.tensor([-4.0, 191 / 16]), (torch.randint(-64, 191, (k - 2,), generator=g) + 0.5) / 16])
    q = ActQuant(ActSpec(bits, gran.replace("static", "per-tensor"), dynamic=gran != "static", symmetric=symmetric))
    q.smooth = torch.rand(k, generator=g) + 0.5 if smooth else None
    if gran == "static":
        q(x[: (m + 1) // 2])  # calibrated on some rows: clamped codes too
        q.freeze()
    got, want = q8.input_codes(q, x, shift), q8.input_codes(q, x, shift, fused=False)
    assert q8._fusable(q, x) and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))
    c, s, z = got  # ActQuant's fake-quant values, too
    assert torch.equal((c.float() + (128 if shift else 0) - z) * s, fake_quantize(q8.smoothed(q, x), s, z, bits))
    if gran == "per-tensor" and not smooth:  # convolution inputs: any layout, same codes
        x4 = x.reshape(1, m, k, 1).contiguous(memory_format=torch.channels_last)
        c4 = q8.tensor_codes(q, x4)[0]
        assert c4.is_contiguous(memory_format=torch.channels_last) and torch.equal(c4, q8.tensor_codes(q, x4, False)[0])


@needs_ops
@pytest.mark.parametrize("dtype,bias", [(torch.int32, False), (torch.int32, True), (torch.float32, True)])
def test_fused_row_epilogue_equals_the_torch_epilogue(dtype, bias):
    acc = torch.randint(-300_000, 300_000, (37, 29), dtype=torch.int32).to(dtype)
    args = (torch.rand(37, 1), torch.randint(-128, 128, (37,)), torch.randint(-4000, 4000, (29,), dtype=torch.int32),
            torch.rand(29), torch.randn(29) if bias else None)
    assert torch.equal(q8.row_epilogue(acc.clone(), *args), q8.row_epilogue(acc.clone(), *args, fused=False))


def test_int8_linear_without_the_fused_ops_gives_identical_output(monkeypatch):
    layers = [Int8Linear.from_quant(_with_input_quant(_quant_linear(70, 24), a, torch.randn(16, 70)))
              for a in (ActSpec(8), ActSpec(8, "per-token", dynamic=True))]
    x, q = torch.randn(2, 9, 70), layers[1].input_quant
    fused = [m(x) for m in layers]
    q.register_buffer("noise", torch.zeros(()))  # state the kernel does not model: the torch ops
    assert not q8._fusable(q, x) and torch.equal(layers[1](x), fused[1])
    monkeypatch.setattr(q8, "_ops", lambda: None)
    assert not q8.available() and all(torch.equal(m(x), y) for m, y in zip(layers, fused))


def _ref_conv_acc(c, z, w, stride, padding, dilation, groups):
    """Σ (c − z) w over im2col patches in int64, padding with code z (x = 0)."""
    x = F.pad(c.long() - z, (padding, padding, padding, padding))  # padded positions: c − z = 0
    out, cg, kh, kw = w.shape
    cols = F.unfold(x.double(), (kh, kw), dilation=dilation, stride=stride).long()  # (B, C·kh·kw, L)
    b, _, length = cols.shape
    cols = cols.view(b, groups, cg * kh * kw, length)
    wg = w.long().view(groups, out // groups, cg * kh * kw)
    acc = torch.einsum("gok,bgkl->bgol", wg, cols).reshape(b, out, length)
    hout = (c.shape[2] + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    return acc.view(b, out, hout, -1)


@pytest.mark.skipif(not k8.exact("onednn"), reason="oneDNN int8 is missing or not exact on this CPU, so "
                    "pick_backend never uses it here")
@SETTINGS
@given(b=st.integers(1, 3), cg=st.integers(1, 6), og=st.integers(1, 6), groups=st.sampled_from([1, 2, 3]),
       hw=st.integers(3, 9), ks=st.sampled_from([1, 3]), stride=st.integers(1, 2), padding=st.integers(0, 1),
       dilation=st.integers(1, 2), extreme=st.booleans(), seed=st.integers(0, 10_000))
def test_onednn_conv_accumulators_are_exact(b, cg, og, groups, hw, ks, stride, padding, dilation, extreme, seed):
    if hw + 2 * padding < dilation * (ks - 1) + 1:
        return
    g = torch.Generator().manual_seed(seed)
    cin, out = cg * groups, og * groups
    c, w = _operands(g, b * cin * hw * hw, 1, out * cg * ks * ks, extreme)
    c, w = c.view(b, cin, hw, hw), w.view(out, cg, ks, ks)
    z = int(torch.randint(0, 256, (), generator=g))
    geo = ((stride, stride), (padding, padding), (dilation, dilation), groups)
    ref = _ref_conv_acc(c, z, w, stride, padding, dilation, groups)
    assert torch.equal(k8.conv_reference(c, z, w, *geo).long(), ref)
    pk = k8.onednn_conv_prepack(w, torch.ones(out), 1.0, z, *geo)
    y = k8.onednn_conv(c.contiguous(memory_format=torch.channels_last), 1.0, z, pk, torch.ones(out), None, *geo)
    assert torch.equal(y.round().long(), ref)  # |A| < 2^24 here: float32 holds it exactly


def _requant_python(acc, real, bias_q, z_out, lo, hi):
    """The stated rule with Python integers: frexp multiplier, round half toward +inf, clamp."""
    import math

    f, e = math.frexp(real)
    m0 = round(f * 2 ** 31)
    if m0 == 2 ** 31:
        m0, e = m0 // 2, e + 1
    shift = 31 - e
    if shift > 62:
        m0, shift = 0, 62
    a = max(-2 ** 31, min(2 ** 31 - 1, acc + bias_q))
    return max(lo, min(hi, ((a * m0 + (1 << (shift - 1))) >> shift) + z_out))


@SETTINGS
@given(m=st.integers(1, 6), n=st.integers(1, 6), log_real=st.floats(-20, 3), signed=st.booleans(),
       with_bias=st.booleans(), seed=st.integers(0, 10_000))
def test_requantize_is_bit_exact_against_its_rounding_rule(m, n, log_real, signed, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-2 ** 31, 2 ** 31, (m, n), generator=g, dtype=torch.int64)
    acc[0, 0] = 2 ** 31 - 1
    acc = torch.where(torch.rand(m, n, generator=g) < 0.5, acc // 2 ** 20, acc).to(torch.int32)  # small ones too
    real = torch.exp2(log_real + torch.rand(n, generator=g, dtype=torch.float64))
    bias_q = torch.randint(-2 ** 20, 2 ** 20, (n,), generator=g) if with_bias else torch.zeros(n, dtype=torch.int64)
    z_out = 0 if signed else int(torch.randint(0, 256, (), generator=g))
    m0, shift = k8.quantize_multiplier(real)
    got = k8.requantize(acc, m0, shift, z_out, 8, signed, bias_q if with_bias else None)
    lo, hi = (-128, 127) if signed else (0, 255)
    want = [[_requant_python(int(acc[i, j]), float(real[j]), int(bias_q[j]), z_out, lo, hi) for j in range(n)]
            for i in range(m)]
    assert got.dtype == (torch.int8 if signed else torch.uint8)
    assert got.long().tolist() == want
    # and it is the float rounding of A·real to within one code
    flt = torch.round((acc.double() + bias_q) * real).add(z_out).clamp(lo, hi)
    assert (got.double() - flt).abs().max() <= 1


def test_quantize_multiplier_represents_the_real_multiplier():
    real = torch.tensor([1e-9, 3e-4, 0.25, 0.5, 0.7, 1 - 1e-12, 1.0, 17.5], dtype=torch.float64)
    m0, shift = k8.quantize_multiplier(real)
    assert bool(((m0 >= 2 ** 30) & (m0 < 2 ** 31)).all())
    assert torch.allclose(m0.double() * torch.exp2(-shift.double()), real, rtol=2 ** -30, atol=0)
    with pytest.raises(QBayesError, match="positive"):
        k8.quantize_multiplier(torch.tensor([0.0]))


# --------------------------------------------------------------------------- modules vs fake-quant
def _quant_linear(k, n, spec=W8, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return QuantLinear.from_quantized(rtn(lin.weight.detach(), None, spec), spec,
                                      None if lin.bias is None else lin.bias.detach(), bias_dtype=torch.float32)


def _quant_conv(cin, out, ks, spec=W8, **geo):
    torch.manual_seed(1)
    cv = nn.Conv2d(cin, out, ks, **geo)
    return QuantConv2d.from_quantized(rtn(cv.weight.detach().reshape(out, -1), None, spec), spec, cv,
                                      bias_dtype=torch.float32)


_with_input_quant = calibrate_input_quant


def _close(y, ref):
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


ACTS = [ActSpec(8), ActSpec(8, symmetric=True), ActSpec(8, dynamic=True), ActSpec(8, "per-token", dynamic=True),
        ActSpec(6, "per-token", dynamic=True, symmetric=True), ActSpec(4)]


@pytest.mark.parametrize("aspec", ACTS, ids=str)
@pytest.mark.parametrize("backend", k8.LINEAR_BACKENDS)
def test_int8_linear_equals_fake_quant(aspec, backend):
    if not k8.exact(backend):
        pytest.skip(f"{backend} is not exact on this CPU")
    ql = _with_input_quant(_quant_linear(96, 40), aspec, torch.randn(64, 96))
    x = torch.randn(3, 11, 96) * 1.3  # beyond the calibrated range: clamped codes too
    x[0, 0] = 0.0
    with torch.no_grad():
        ref = ql(x)
        y = Int8Linear.from_quant(ql, backend)(x)
    assert y.shape == ref.shape
    _close(y, ref)


def test_int8_linear_smoothquant_factor_and_no_bias():
    ql = _quant_linear(64, 24, bias=False)
    q = attach_input_quant(ql, ActQuant(ActSpec(8)))
    q.smooth = torch.rand(64) + 0.5
    with torch.no_grad():
        ql(torch.randn(32, 64))
        q.freeze()
        x = torch.randn(20, 64)
        _close(Int8Linear.from_quant(ql)(x), ql(x))


@pytest.mark.parametrize("aspec", [ActSpec(8), ActSpec(8, symmetric=True), ActSpec(8, dynamic=True), ActSpec(5)], ids=str)
@pytest.mark.parametrize("geo", [dict(padding=1), dict(stride=2, padding=1, groups=4), dict(dilation=2)], ids=str)
@pytest.mark.parametrize("backend", k8.CONV_BACKENDS)
def test_int8_conv_equals_fake_quant(aspec, geo, backend):
    if not k8.exact(backend):
        pytest.skip(f"{backend} is not exact on this CPU")
    qc = _with_input_quant(_quant_conv(8, 12, 3, **geo), aspec, torch.randn(6, 8, 10, 10))
    x = torch.randn(2, 8, 10, 10) * 1.2
    with torch.no_grad():
        ref = qc(x)
        ic = Int8Conv2d.from_quant(qc, backend)
        y = ic(x)
        y_cl = ic(x.contiguous(memory_format=torch.channels_last))
        y_nchw = Int8Conv2d.from_quant(qc, backend, channels_last_output=False)(x)
    _close(y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last) and y_nchw.is_contiguous()
    assert torch.equal(y_cl, y) and torch.equal(y_nchw, y)


def test_forward_requantized_is_the_integer_epilogue_of_the_exact_accumulator():
    for aspec in (ActSpec(8), ActSpec(8, "per-token", dynamic=True)):
        ql = _with_input_quant(_quant_linear(64, 16), aspec, torch.randn(40, 64))
        il = Int8Linear.from_quant(ql)
        x = torch.randn(24, 64)
        with torch.no_grad():
            y = il(x)
            q = il.forward_requantized(x, 0.02, 100)
            s, z = ql.input_quant.params(x)
            codes = torch.clamp(torch.round(x / s) + z, 0, 255)
            acc = k8.int_mm_reference(codes, z, il.weight)
            real = s.double().reshape(-1, 1) * il.w_scale.double() / 0.02
            bq = k8.bias_to_acc(il.bias, s.reshape(-1, 1), il.w_scale)
            m0, shift = k8.quantize_multiplier(real)
            assert torch.equal(q, k8.requantize(acc, m0, shift, 100, 8, False, bq))
            assert (q.double() - torch.clamp(torch.round(y.double() / 0.02) + 100, 0, 255)).abs().max() <= 1


def test_state_dict_round_trip_repacks():
    ql = _with_input_quant(_quant_linear(32, 8), ActSpec(8), torch.randn(16, 32))
    il = Int8Linear.from_quant(ql)
    other = Int8Linear.from_quant(_with_input_quant(_quant_linear(32, 8, seed=5), ActSpec(8), torch.randn(16, 32)))
    other.load_state_dict(il.state_dict())
    x = torch.randn(5, 32)
    assert "colsum" not in il.state_dict() and torch.equal(other(x), il(x))


# --------------------------------------------------------------------------- to_int8_ and errors
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 6 * 6, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def test_to_int8_converts_eligible_layers_and_reports_the_rest():
    import qbayes

    torch.manual_seed(0)
    m = _Net().eval()
    calib = torch.randn(32, 3, 6, 6)
    qbayes.quantize_(m, W8, method="rtn", convs=True, exclude=["head"], progress=False)
    qbayes.quantize_activations_(m, ActSpec(8), calib, exclude=(), progress=False)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        ref = m(x)
        i8 = copy.deepcopy(m)
        rep = to_int8_(i8)
        y = i8(x)
    assert rep["converted"] == {"conv": "Int8Conv2d", "dw": "Int8Conv2d", "fc": "Int8Linear"}
    assert set(rep["left"]) == {"head"} and "float weights" in rep["left"]["head"]
    assert isinstance(i8.fc, Int8Linear) and isinstance(i8.head, nn.Linear)
    # each layer equals fake quant to rounding; across layers a rounding difference can move a code by one
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-2


@pytest.mark.parametrize("case,match", [
    ("uncalibrated", "not calibrated"), ("grouped", "grouped weights"), ("asym", "asymmetric weights"),
    ("nf4", "nf4 weights"), ("log_act", "log2 activations"), ("per_channel_act", "per-channel activation"),
    ("no_quant", "no input quantizer"), ("conv_per_token", "per-token activation ranges"),
])
def test_unsupported_layers_raise_clear_errors_and_stay_in_fake_quant(case, match):
    spec = {"grouped": QuantSpec(8, 32, symmetric=True, clip="minmax"), "asym": QuantSpec(8, -1, clip="minmax"),
            "nf4": QuantSpec(4, 32, format="nf4", clip="minmax")}.get(case, W8)
    aspec = {"log_act": ActSpec(8, format="log2"), "per_channel_act": ActSpec(8, "per-channel"),
             "conv_per_token": ActSpec(8, "per-token", dynamic=True)}.get(case, ActSpec(8))
    layer = _quant_conv(4, 8, 3) if case == "conv_per_token" else _quant_linear(64, 8, spec)
    if case == "uncalibrated":
        attach_input_quant(layer, ActQuant(aspec))
    elif case != "no_quant":
        calib = torch.randn(2, 4, 5, 5) if case == "conv_per_token" else torch.randn(8, 64)
        _with_input_quant(layer, aspec, calib.abs() if case == "log_act" else calib)
    build = Int8Conv2d.from_quant if isinstance(layer, QuantConv2d) else Int8Linear.from_quant
    with pytest.raises(QBayesError, match=match):
        build(layer)
    model = nn.Sequential(layer)
    rep = to_int8_(model)
    assert rep["converted"] == {} and match in rep["left"]["0"] and model[0] is layer


def test_backend_choice_errors():
    ql = _with_input_quant(_quant_linear(16, 8), ActSpec(8), torch.randn(8, 16))
    with pytest.raises(QBayesError, match="unknown int8 linear backend"):
        Int8Linear.from_quant(ql, "cublas")
    with pytest.raises(KernelError, match="CPU only"):
        Int8Linear.from_quant(ql)(torch.randn(2, 16, device="meta"))
