"""Triton kernels for packed 2..8-bit weights with group scales (GPU; CPU under Triton's interpreter).

The packed layout is qbayes's own (:mod:`qbayes.formats.packing`): the codes of a row form one
little-endian bit stream, code ``k`` at bit ``k * bits``, so a code is read from at most two
bytes for every width (3-bit codes straddle bytes, 2/4/8-bit ones never do). Weights are
``w = (c - z) s`` with float16 scales per group of input columns and packed zero-points (or the
symmetric ``2^(bits-1)``), computed in float32 exactly as the reference path computes them.

* :func:`qlinear`: ``y = x Wᵀ (+ b)`` reading the packed bytes directly. Few rows (decoding)
  reduce with broadcast-multiply-sum over a ``(BLOCK_K, BLOCK_N)`` tile; 16 rows and more use
  ``tl.dot`` (float32 inputs in IEEE precision, so no TF32 rounding).
* :func:`dequant`: the dense weight in the activation dtype, for dequantize-then-matmul at
  large batches where the tensor cores' GEMM wins.

``TRITON_INTERPRET=1`` runs both on CPU tensors (how CI tests them); without a GPU and without
the interpreter :func:`available` is false and QuantLinear uses the other paths.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: only CUDA machines (and the CI interpreter tests) need it
    triton = None
    tl = None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the Triton kernels can run here (a CUDA device, or Triton's interpreter)."""
    if triton is None or os.environ.get("QBAYES_KERNEL", "").lower() == "reference":
        return False
    return interpreted() or torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _codes(ptr, row_bytes, rows, cols, mask, BITS: tl.constexpr):
        """Codes at (row, col) of a packed bit stream per row: ``rows``/``cols`` broadcast."""
        off = cols * BITS
        byte = off // 8
        p = ptr + rows * row_bytes + byte
        b = tl.load(p, mask=mask, other=0).to(tl.int32)
        if (8 % BITS) != 0:  # a code may continue in the next byte
            b1 = tl.load(p + 1, mask=mask & (byte + 1 < row_bytes), other=0).to(tl.int32)
            b = b | (b1 << 8)
        return (b >> (off % 8)) & ((1 << BITS) - 1)

    @triton.jit
    def _weight_tile(qw_ptr, sc_ptr, qz_ptr, offs_n, offs_k, n_mask, k_mask, row_bytes, zrow_bytes, G, GS,
                     BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
        """Dequantized float32 tile ``(BLOCK_K, BLOCK_N)`` of ``Wᵀ``."""
        rows = offs_n[None, :]
        cols = offs_k[:, None]
        mask = n_mask[None, :] & k_mask[:, None]
        c = _codes(qw_ptr, row_bytes, rows, cols, mask, BITS).to(tl.float32)
        g = cols // GS
        s = tl.load(sc_ptr + rows * G + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = _codes(qz_ptr, zrow_bytes, rows, g, mask, BITS).to(tl.float32)
        else:
            z = (1 << (BITS - 1)) * 1.0
        return (c - z) * s

    @triton.jit
    def _qlinear_kernel(x_ptr, qw_ptr, sc_ptr, qz_ptr, b_ptr, y_ptr, M, N, K, G, GS, row_bytes, zrow_bytes,
                        BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0).to(tl.float32)
            w = _weight_tile(qw_ptr, sc_ptr, qz_ptr, offs_n, offs_k, n_mask, k_mask, row_bytes, zrow_bytes, G, GS,
                             BITS, HAS_ZERO)
            if USE_DOT:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _dequant_kernel(qw_ptr, sc_ptr, qz_ptr, w_ptr, N, K, G, GS, row_bytes, zrow_bytes,
                        BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        k_mask = offs_k < K
        w = _weight_tile(qw_ptr, sc_ptr, qz_ptr, offs_n, offs_k, n_mask, k_mask, row_bytes, zrow_bytes, G, GS,
                         BITS, HAS_ZERO)
        tl.store(w_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(w_ptr.dtype.element_ty),
                 mask=n_mask[None, :] & k_mask[:, None])


def _check(qweight, scales, qzeros, bits, in_features, group_cols):
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if not 2 <= bits <= 8:
        raise ValueError(f"unsupported bit-width {bits}")
    if in_features % group_cols or scales.shape[1] != in_features // group_cols:
        raise ValueError("scales do not match the group size")
    if not (qweight.is_contiguous() and scales.is_contiguous() and (qzeros is None or qzeros.is_contiguous())):
        raise ValueError("packed tensors must be contiguous")


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
            bias: torch.Tensor | None, bits: int, in_features: int, group_cols: int) -> torch.Tensor:
    """``x (M, K) @ Wᵀ (+ bias)`` in ``x``'s dtype (float32 accumulation) from the packed weight."""
    _check(qweight, scales, qzeros, bits, in_features, group_cols)
    x = x.contiguous()
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    use_dot = M >= 16
    BM = 16 if use_dot else 1 << max(0, (M - 1).bit_length())
    BM = min(BM, 64)
    BN, BK = (64, 32) if use_dot else (64, 64)
    if interpreted():
        BN, BK = 32, 32  # smaller tiles keep the numpy interpreter quick
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM))
    _qlinear_kernel[grid](x, qweight, scales, qzeros if qzeros is not None else qweight,
                          bias if bias is not None else y, y, M, N, K, scales.shape[1], group_cols,
                          qweight.shape[1], qzeros.shape[1] if qzeros is not None else 0,
                          BITS=bits, HAS_ZERO=qzeros is not None, HAS_BIAS=bias is not None, USE_DOT=use_dot,
                          BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    return y


def dequant(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
            in_features: int, group_cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``(out, in)`` weight in ``dtype``: float32 values equal the reference dequantization."""
    _check(qweight, scales, qzeros, bits, in_features, group_cols)
    N = qweight.shape[0]
    out_dtype = dtype
    if interpreted():  # numpy has no bfloat16: the interpreter truncates; round in torch instead
        dtype = torch.float32
    w = torch.empty(N, in_features, dtype=dtype, device=qweight.device)
    BN, BK = (32, 32) if interpreted() else (32, 128)
    grid = (triton.cdiv(N, BN), triton.cdiv(in_features, BK))
    _dequant_kernel[grid](qweight, scales, qzeros if qzeros is not None else qweight, w, N, in_features,
                          scales.shape[1], group_cols, qweight.shape[1], qzeros.shape[1] if qzeros is not None else 0,
                          BITS=bits, HAS_ZERO=qzeros is not None, BLOCK_N=BN, BLOCK_K=BK)
    return w.to(out_dtype)
