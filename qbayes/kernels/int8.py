r"""Integer GEMMs for W8A8 layers: int8 operands, int32 accumulation, float or integer epilogues.

Operands. An activation is a matrix of unsigned codes ``c ∈ [0, 2^b − 1]`` (``b ≤ 8``) with a
scale ``s_x`` and an integer zero-point ``z_x``, one per tensor or one per row (token), so
``x̂ = s_x (c − z_x)``; symmetric activations are the case ``z_x = 128``. A weight is a
signed int8 matrix ``W_q`` ``(N, K)`` with one scale ``s_w[n]`` per output channel (symmetric:
no zero-point), ``Ŵ = s_w W_q``. Every backend computes the exact int32 accumulator

.. math::  A_{mn} = \sum_k (c_{mk} − z_x)\,W_{q,nk} = \sum_k c_{mk} W_{q,nk} − z_x \textstyle\sum_k W_{q,nk},

(the zero-point is folded in through the column sums ``Σ_k W_q``), and the *dequantize
epilogue* gives ``y = s_x s_w[n] A_{mn} + b_n`` in float32. The *requantize epilogue* maps
``A`` straight to the next layer's codes (:func:`requantize`, integer fixed point).

Backends (all exact in the accumulator; which is fastest is measured in ``bench/int8.py``):

* ``onednn``: oneDNN's int8 GEMM and convolution (``onednn::qlinear_pointwise`` /
  ``onednn::qconv_pointwise``) on uint8 codes, float32 output, the dequantize epilogue and the
  bias inside the kernel (the fastest here);
* ``fbgemm``: torch's fbgemm int8 GEMM (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``,
  prepacked weights), which quantizes its float input itself as ``clamp(nearbyint(X + z), 0, 255)``:
  fed ``X = ⌊x / s_x⌉`` (exact integers) that is exactly ``c``;
* ``int_mm``: ``torch._int_mm`` (int8 × int8 → int32; codes shifted to ``c − 128``);
* ``reference``: int64 ``torch.matmul`` / a float64 convolution (always works, slow).

The codes are always the activation quantizer's own (:func:`quantize_codes`, or the fused one-pass
kernels of :mod:`qbayes.kernels.int8_quantize`, bit for bit the same). On CPUs without
VNNI, fbgemm and oneDNN multiply ``u8 × s8`` pairs with int16 saturation; :func:`exact` probes a
backend once on worst-case operands, and callers fall back to an exact one where it fails.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch.nn import functional as F

from ..errors import KernelError, QBayesError

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


# --------------------------------------------------------------------------- integer GEMMs
def weight_colsum(w_q: torch.Tensor) -> torch.Tensor:
    """``Σ_k W_q[n, k]`` as int32 ``(N,)``: what a zero-point ``z_x`` subtracts, ``z_x Σ_k W_q``."""
    return w_q.reshape(w_q.shape[0], -1).sum(1, dtype=torch.int32)


def _zero(z, rows: int) -> torch.Tensor:
    """A zero-point as an int64 column ``(rows, 1)`` or scalar tensor."""
    z = torch.as_tensor(z)
    if z.is_floating_point() and not torch.equal(z, z.round()):
        raise QBayesError("activation zero-points must be integers")
    z = z.round().to(torch.int64)
    return z.reshape(-1, 1) if z.numel() > 1 else z.reshape(())


def int_mm_reference(codes: torch.Tensor, zero, w_q: torch.Tensor) -> torch.Tensor:
    """The integer reference: ``A = (c − z_x) W_qᵀ`` in int64, returned as int32 ``(M, N)``.

    ``codes`` ``(M, K)`` integer, ``zero`` a scalar or ``(M,)``/``(M, 1)`` per-row zero-points,
    ``w_q`` ``(N, K)`` int8. Raises if an accumulator does not fit int32.
    """
    acc = (codes.to(torch.int64) - _zero(zero, codes.shape[0])) @ w_q.to(torch.int64).t()
    if acc.numel() and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise KernelError("an int8 GEMM accumulator overflows int32 (K too large)")
    return acc.to(torch.int32)


def int_mm_shapes_ok(m: int, k: int, n: int) -> bool:
    """Shapes ``torch._int_mm`` takes on the CPU: more than 16 rows, ``K`` and ``N`` multiples of 8."""
    return m > 16 and k % 8 == 0 and n % 8 == 0


def int_mm(codes: torch.Tensor, zero, w_t: torch.Tensor, colsum: torch.Tensor) -> torch.Tensor:
    """``A = (c − z_x) W_qᵀ`` with ``torch._int_mm``: ``(c − 128) W_qᵀ − (z_x − 128) Σ_k W_q``.

    ``w_t`` is ``W_qᵀ`` ``(K, N)`` int8 (contiguous), ``colsum`` :func:`weight_colsum`. Shapes
    ``_int_mm`` refuses (:func:`int_mm_shapes_ok`) go to :func:`int_mm_reference`.
    """
    m, k = codes.shape
    if not int_mm_shapes_ok(m, k, w_t.shape[1]):
        return int_mm_reference(codes, zero, w_t.t())
    if codes.dtype == torch.uint8:
        shifted = (codes.to(torch.int16) - 128).to(torch.int8)
    else:  # codes held in a wider dtype (or float holding integers)
        shifted = (codes.to(torch.int32) - 128).to(torch.int8)
    acc = torch._int_mm(shifted, w_t)
    z = _zero(zero, m)
    return acc - ((z - 128) * colsum.to(torch.int64)).to(torch.int32)


def dequantize_acc(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantize epilogue ``y = s_x s_w[n] A + b`` in float32 (``s_x`` scalar or ``(M, 1)``)."""
    y = acc.to(torch.float32) * (x_scale.to(torch.float32) * w_scale.to(torch.float32))
    return y if bias is None else y.add_(bias.to(torch.float32))


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8) -> torch.Tensor:
    r"""The activation codes ``c = clamp(⌊x / s⌉ + z, 0, 2^b − 1)`` as uint8, bit for bit the
    quantizer's (``⌊·⌉`` half to even), for a scalar ``(s, z)`` or per-row ``(M, 1)`` ones of a 2-D ``x``.

    ``⌊x / s⌉`` is rounded by torch first; torch's vectorised quantize then adds ``z`` (exact on
    integers) and clamps to 0..255 in one pass, its buffer viewed as a plain uint8 tensor. Where that
    routine is missing the same codes come from ``add_``/``clamp_``/``to``.
    """
    X = torch.div(x, scale).round_()
    zero = torch.as_tensor(zero, dtype=X.dtype)
    top = (1 << bits) - 1
    if top < 255:
        X = torch.clamp(X, -zero, top - zero, out=X)
    if zero.numel() > 1:  # per-row zero-points: fold them in first (integers: exact)
        X.add_(zero)
        zero = torch.zeros(())
    try:
        with warnings.catch_warnings():  # torch marks quantized tensors as deprecated
            warnings.simplefilter("ignore")
            q = torch.quantize_per_tensor(X, 1.0, int(zero), torch.quint8)
        return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())
    except (RuntimeError, AttributeError, NotImplementedError):
        return X.add_(zero).clamp_(0, top).to(torch.uint8)


# --------------------------------------------------------------------------- requantization
def quantize_multiplier(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fixed-point form of positive multipliers: ``real ≈ m₀ · 2^{−shift}``, ``m₀ ∈ [2^30, 2^31)``.

    ``(f, e) = frexp(real)`` (``f ∈ [0.5, 1)``), ``m₀ = round(f · 2^31)`` (``2^31`` becomes
    ``2^30`` with ``e + 1``), ``shift = 31 − e``. Multipliers below ``2^{−32}`` (every product
    with an int32 rounds to 0) become ``m₀ = 0, shift = 62``. Both int64, ``real``'s shape.
    """
    real = real.to(torch.float64)
    if bool((real <= 0).any()) or not bool(torch.isfinite(real).all()):
        raise QBayesError("requantization multipliers s_x·s_w/s_out must be positive and finite")
    f, e = torch.frexp(real)
    m0 = torch.round(f * 2.0 ** 31).to(torch.int64)
    e = e.to(torch.int64)
    carry = m0 == (1 << 31)
    m0, e = torch.where(carry, m0 // 2, m0), torch.where(carry, e + 1, e)
    shift = 31 - e
    if bool((shift < 1).any()):
        raise QBayesError("a requantization multiplier s_x·s_w/s_out is ≥ 2^30: the output scale is far too small")
    tiny = shift > 62
    return torch.where(tiny, torch.zeros_like(m0), m0), torch.where(tiny, torch.full_like(shift, 62), shift)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor, out_zero: int,
               bits: int = 8, signed: bool = False, bias_acc: torch.Tensor | None = None) -> torch.Tensor:
    r"""The requantize epilogue: int32 accumulators to the next layer's codes, in integers only.

    .. math::  A' = \mathrm{sat}_{32}(A + b_q),\qquad
               q = \mathrm{clamp}\big(\lfloor (A' m₀ + 2^{shift−1}) / 2^{shift} \rfloor + z_{out},\ q_{min}, q_{max}\big)

    i.e. ``A' · real`` rounded to nearest with ties toward +∞, where ``(m₀, shift)`` is
    :func:`quantize_multiplier` of ``real = s_x s_w[n] / s_out`` and ``b_q = round(b / (s_x s_w))``
    is the bias on the accumulator's scale (:func:`bias_to_acc`). ``[q_min, q_max]`` is
    ``[0, 2^b − 1]`` (uint8) or ``[−2^{b−1}, 2^{b−1} − 1]`` (int8, ``signed``). Within one code of
    ``round(y / s_out) + z_out`` for the float output ``y``; exact against the formula above.
    """
    a = acc.to(torch.int64)
    if bias_acc is not None:
        a = (a + bias_acc.to(torch.int64)).clamp_(INT32_MIN, INT32_MAX)
    shift = shift.to(torch.int64)
    half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    q = torch.bitwise_right_shift(a * multiplier.to(torch.int64) + half, shift) + int(out_zero)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return q.clamp_(lo, hi).to(torch.int8 if signed else torch.uint8)


def bias_to_acc(bias: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``b_q = round(b / (s_x s_w))`` (half to even, float64), saturated to int32: the bias on the
    accumulator's scale."""
    q = torch.round(bias.double() / (x_scale.double() * w_scale.double()))
    return q.clamp_(INT32_MIN, INT32_MAX).to(torch.int64)


# --------------------------------------------------------------------------- fbgemm / oneDNN
def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def onednn_available() -> bool:
    return "onednn" in torch.backends.quantized.supported_engines and hasattr(torch.ops.onednn, "qconv_pointwise") \
        and hasattr(torch.ops.onednn, "qlinear_pointwise")


@contextlib.contextmanager
def _engine(name: str):
    """Prepack under quantized engine ``name`` (torch keeps it process-wide), then restore it."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def fbgemm_prepack(w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None):
    """Pack ``W_q`` ``(N, K)`` int8 with per-channel scales ``w_scale`` (float32 ``(N,)``) and an
    optional float bias for :func:`fbgemm_linear`; the scales may carry a static ``s_x`` already."""
    if not fbgemm_available():
        raise KernelError("this torch build has no fbgemm quantized engine; use backend='int_mm' or 'reference'")
    n = w_q.shape[0]
    with warnings.catch_warnings():  # torch marks quantized tensor creation as deprecated
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(w_q.to(torch.int8).contiguous(), w_scale.to(torch.float64),
                                                      torch.zeros(n, dtype=torch.int64), 0)
    with _engine("fbgemm"):
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().contiguous())


def fbgemm_linear(x_int: torch.Tensor, zero: int, packed) -> torch.Tensor:
    r"""fbgemm's int8 GEMM on ``X`` = float32 ``(M, K)`` holding integers (``⌊x / s⌉``):

    it forms ``c = clamp(X + z, 0, 255)`` (exact on integers), accumulates ``A = Σ_k (c − z) W_q`` in int32
    and returns ``s_w[n] A + b`` in float32 with the scales and bias ``packed`` holds.
    """
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x_int, 1.0, int(zero), packed)


def onednn_linear_prepack(w_q: torch.Tensor):
    """Pack ``W_q`` ``(N, K)`` int8 for :func:`onednn_linear` (the scales are given per call)."""
    if not onednn_available():
        raise KernelError("this torch build has no oneDNN int8 GEMM; use backend='int_mm' or 'reference'")
    return torch.ops.onednn.qlinear_prepack(w_q.to(torch.int8).contiguous(), None)


@functools.lru_cache(maxsize=64)
def _no_zero_points(n: int) -> torch.Tensor:
    """The weights' zero-points (symmetric: all 0), built once per width (the kernels only read it)."""
    return torch.zeros(n, dtype=torch.int64)


def onednn_linear(codes: torch.Tensor, x_scale: float, x_zero: int, packed, w_scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    r"""oneDNN's int8 GEMM on uint8 codes ``(M, K)``: ``y = s_x s_w[n] Σ_k (c − z_x) W_q + b`` in float32."""
    return torch.ops.onednn.qlinear_pointwise(codes, float(x_scale), int(x_zero), packed, w_scale, _no_zero_points(
        w_scale.numel()), bias, 1.0, 0, torch.float32, "none", [], "")


def onednn_conv_prepack(w_q: torch.Tensor, w_scale: torch.Tensor, x_scale: float, x_zero: int, stride, padding,
                        dilation, groups: int):
    """Pack an int8 kernel ``(O, C/groups, kh, kw)`` for :func:`onednn_conv`."""
    if not onednn_available():
        raise KernelError("this torch build has no oneDNN int8 convolution; use backend='reference'")
    return torch.ops.onednn.qconv_prepack(w_q.to(torch.int8).contiguous(), w_scale.float(), float(x_scale),
                                          int(x_zero), list(stride), list(padding), list(dilation), groups, None)


def onednn_conv(codes: torch.Tensor, x_scale: float, x_zero: int, packed, w_scale: torch.Tensor,
                bias: torch.Tensor | None, stride, padding, dilation, groups: int) -> torch.Tensor:
    r"""oneDNN int8 convolution of uint8 codes ``(B, C, H, W)`` (channels-last is fastest):
    ``y = s_x s_w[o] Σ (c − z_x) W_q + b`` in float32, zero padding meaning code ``z_x``."""
    return torch.ops.onednn.qconv_pointwise(codes, float(x_scale), int(x_zero), packed, w_scale.float(), torch.zeros(
        w_scale.numel(), dtype=torch.int64), bias, list(stride), list(padding), list(dilation), groups, 1.0, 0,
        torch.float32, "none", [], "")


def conv_reference(codes: torch.Tensor, zero, w_q: torch.Tensor, stride, padding, dilation,
                   groups: int) -> torch.Tensor:
    """The integer reference convolution ``Σ (c − z_x) W_q`` (zero padding = code ``z_x``), int32.

    Computed in float64, where every product and partial sum is an exact integer (< 2^53)."""
    z = torch.as_tensor(zero).to(torch.float64)
    acc = F.conv2d(codes.to(torch.float64) - z, w_q.to(torch.float64), None, stride, padding, dilation, groups)
    if acc.numel() and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise KernelError("an int8 convolution accumulator overflows int32")
    return acc.to(torch.int32)


# --------------------------------------------------------------------------- exactness probes
@functools.lru_cache(maxsize=None)
def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI or AVX-VNNI (``/proc/cpuinfo``; False where unreadable):
    without it, x86 int8 kernels of fbgemm, oneDNN and ONNX Runtime multiply ``u8 × s8`` pairs
    with int16 saturation (ONNX Runtime's fused QDQ operators included)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@functools.lru_cache(maxsize=None)
def exact(backend: str) -> bool:
    """Whether ``backend`` reproduces the integer reference on this CPU, probed once on
    worst-case operands (codes 0/255 against weights ±127/−128, where int16 pair sums saturate)."""
    if backend == "reference":
        return True
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2, (24, 64), generator=g).to(torch.uint8) * 255
    w = torch.where(torch.randint(0, 2, (16, 64), generator=g).bool(), 127, -128).to(torch.int8)
    w[:, :32] = 127
    c[:, :32] = 255
    z = 3
    ref = int_mm_reference(c, z, w)
    try:
        if backend == "int_mm":
            got = int_mm(c, z, w.t().contiguous(), weight_colsum(w))
        elif backend == "fbgemm":
            got = fbgemm_linear(c.float() - z, z, fbgemm_prepack(w, torch.ones(16))).round().to(torch.int32)
        elif backend == "onednn":
            lin = onednn_linear(c, 1.0, z, onednn_linear_prepack(w), torch.ones(16), None).round().to(torch.int32)
            if not torch.equal(lin, ref):
                return False
            cw = w.view(16, 64, 1, 1)
            pk = onednn_conv_prepack(cw, torch.ones(16), 1.0, z, (1, 1), (0, 0), (1, 1), 1)
            x = c.t().reshape(1, 64, 24, 1).contiguous(memory_format=torch.channels_last)
            y = onednn_conv(x, 1.0, z, pk, torch.ones(16), None, (1, 1), (0, 0), (1, 1), 1)
            got = y.reshape(16, 24).t().round().to(torch.int32)
        else:
            raise QBayesError(f"unknown int8 backend {backend!r}: choose one of {LINEAR_BACKENDS}")
    except (RuntimeError, NotImplementedError, AttributeError, KernelError):
        return False
    # the probe's accumulators stay below 2^24, so the float32 outputs hold them exactly
    return bool(torch.equal(got, ref))


LINEAR_BACKENDS = ("onednn", "fbgemm", "int_mm", "reference")  # fastest first (bench/int8.py)
CONV_BACKENDS = ("onednn", "reference")


def pick_backend(kind: str, backend: str = "auto") -> str:
    """The fastest exact backend for ``kind`` (``"linear"``/``"conv"``), or check a requested one."""
    choices = LINEAR_BACKENDS if kind == "linear" else CONV_BACKENDS
    if backend == "auto":
        return next(b for b in choices if exact(b))
    if backend not in choices:
        raise QBayesError(f"unknown int8 {kind} backend {backend!r}: choose 'auto' or one of {choices}")
    if not exact(backend):
        raise KernelError(f"the {backend} int8 backend is unavailable or not exact on this CPU; use backend='auto'")
    return backend
