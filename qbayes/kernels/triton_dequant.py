"""Dequantization of a packed weight on the GPU: the dense ``(out, in)`` weight in the activation
dtype, for dequantize-then-matmul at large batches where the tensor cores' GEMM wins. Float32
results equal the reference path's (multiply-adds are not fused). 2/4/8-bit layouts in whole
words use the word kernel, with its launch shape timed once per weight shape on a GPU; other
widths read codes byte by byte."""
from __future__ import annotations

import os

import torch

from .triton_base import _EXACT, _cdiv, _check, _word_ok, interpreted, tl, triton

if triton is not None:
    from .triton_tiles import _code_minus_zero, _weight_tile, _word_tile

    @triton.jit
    def _dequant_words_kernel(qw_ptr, sc_ptr, qz_ptr, w_ptr, N, K, G, GS, row_words, zrow_bytes, BITS: tl.constexpr,
                              HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        wi = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        mask = (offs_n < N)[:, None] & (wi < row_words)[None, :]
        words, s, zb = _word_tile(qw_ptr, sc_ptr, qz_ptr, offs_n[:, None], wi[None, :], mask, row_words, G, GS,
                                  zrow_bytes, BITS, HAS_ZERO)
        base = w_ptr + offs_n[:, None] * K + wi[None, :] * PER
        for i in tl.static_range(PER):
            tl.store(base + i, (_code_minus_zero(words, zb, i, BITS) * s).to(w_ptr.dtype.element_ty), mask=mask)

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


_DEQ_TUNED: dict = {}
_DEQ_CANDIDATES = ((32, 16, 4), (64, 8, 4), (16, 32, 4), (64, 16, 8), (128, 8, 8))


def _dequant_words(qweight, scales, qzeros, bits, in_features, group_cols, w, cfg):
    bn, bw, warps = cfg
    row_words = qweight.shape[1] // 4
    N = qweight.shape[0]
    kw = {} if interpreted() else {"num_warps": warps, **_EXACT}
    grid = (_cdiv(N, bn), _cdiv(row_words, bw))
    _dequant_words_kernel[grid](qweight.view(torch.int32), scales, qzeros if qzeros is not None else qweight, w, N,
                                in_features, scales.shape[1], group_cols, row_words,
                                qzeros.shape[1] if qzeros is not None else 0, BITS=bits,
                                HAS_ZERO=qzeros is not None, BLOCK_N=bn, BLOCK_W=bw, **kw)
    return w


def dequant(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
            in_features: int, group_cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``(out, in)`` weight in ``dtype``: float32 values equal the reference dequantization."""
    _check(qweight, scales, qzeros, bits, in_features, group_cols)
    N = qweight.shape[0]
    out_dtype = dtype
    if interpreted():  # numpy has no bfloat16: the interpreter truncates; round in torch instead
        dtype = torch.float32
    w = torch.empty(N, in_features, dtype=dtype, device=qweight.device)
    if _word_ok(qweight, bits, in_features, group_cols):
        key = (w.device, dtype, bits, qzeros is not None, N, in_features, group_cols)
        cfg = _DEQ_TUNED.get(key)
        if cfg is None:
            cfg = (32, 4, 4) if interpreted() else _DEQ_CANDIDATES[0]
            capturing = w.is_cuda and torch.cuda.is_current_stream_capturing()
            if w.is_cuda and os.environ.get("QBAYES_TRITON_TUNE", "1") != "0" and not capturing:
                from triton.testing import do_bench
                ms = {c: do_bench(lambda c=c: _dequant_words(qweight, scales, qzeros, bits, in_features, group_cols,
                                                             w, c), warmup=5, rep=20, return_mode="median")
                      for c in _DEQ_CANDIDATES}
                cfg = min(ms, key=ms.get)
            if not capturing:
                _DEQ_TUNED[key] = cfg
        return _dequant_words(qweight, scales, qzeros, bits, in_features, group_cols, w, cfg).to(out_dtype)
    BN, BK = (32, 32) if interpreted() else (32, 128)
    grid = (_cdiv(N, BN), _cdiv(in_features, BK))
    _dequant_kernel[grid](qweight, scales, qzeros if qzeros is not None else qweight, w, N, in_features,
                          scales.shape[1], group_cols, qweight.shape[1], qzeros.shape[1] if qzeros is not None else 0,
                          BITS=bits, HAS_ZERO=qzeros is not None, BLOCK_N=BN, BLOCK_K=BK,
                          **({} if interpreted() else _EXACT))
    return w.to(out_dtype)
