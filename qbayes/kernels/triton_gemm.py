"""The Triton kernels for more than a few rows, with ``tl.dot``: ``_dotw_kernel`` (2/4/8-bit
codes read as 32-bit words, one dot per code position, on the tensor cores), ``_qlinear_kernel``
(any width 2..8, codes read byte by byte into a dequantized ``(BLOCK_K, BLOCK_N)`` tile; also the
few-row fallback without dots), and ``_split_sum_kernel``, which adds K splits' float32 partial
sums in split order."""
from __future__ import annotations

from .triton_base import tl, triton

if triton is not None:
    from .triton_tiles import _code_minus_zero, _store_rows, _weight_tile, _word_tile

    @triton.jit
    def _dotw_kernel(x_ptr, qw_ptr, sc_ptr, qz_ptr, b_ptr, y_ptr, M, N, K, G, GS, row_words, zrow_bytes,
                     words_per_split, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HALF_DOT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_W: tl.constexpr):
        """Rows of ``x`` times 32-bit words of codes on the tensor cores: for each code position
        ``i`` in a word, ``x[:, word * PER + i] @ (c_i - z) s`` is one ``tl.dot`` over the words."""
        PER: tl.constexpr = 32 // BITS
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_w = tl.arange(0, BLOCK_W)
        lo = pid_k * words_per_split
        hi = tl.minimum(lo + words_per_split, row_words)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for w0 in range(lo, hi, BLOCK_W):
            wi = w0 + offs_w
            w_mask = wi < hi
            words, s, zb = _word_tile(qw_ptr, sc_ptr, qz_ptr, offs_n[None, :], wi[:, None],
                                      w_mask[:, None] & n_mask[None, :], row_words, G, GS, zrow_bytes, BITS, HAS_ZERO)
            for i in tl.static_range(PER):
                xi = tl.load(x_ptr + offs_m[:, None] * K + (wi * PER + i)[None, :],
                             mask=m_mask[:, None] & w_mask[None, :], other=0.0)
                wv = _code_minus_zero(words, zb, i, BITS) * s
                if HALF_DOT:
                    acc += tl.dot(xi, wv.to(xi.dtype))
                else:
                    acc += tl.dot(xi.to(tl.float32), wv, input_precision="ieee")
        _store_rows(acc, y_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, M, N, SPLIT, HAS_BIAS)

    @triton.jit
    def _qlinear_kernel(x_ptr, qw_ptr, sc_ptr, qz_ptr, b_ptr, y_ptr, M, N, K, G, GS, row_bytes, zrow_bytes,
                        k_per_split, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                        USE_DOT: tl.constexpr, HALF_DOT: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        lo = pid_k * k_per_split
        hi = tl.minimum(lo + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(lo, hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hi
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            w = _weight_tile(qw_ptr, sc_ptr, qz_ptr, offs_n, offs_k, n_mask, k_mask, row_bytes, zrow_bytes, G, GS,
                             BITS, HAS_ZERO)
            if USE_DOT:
                if HALF_DOT:
                    acc += tl.dot(x, w.to(x.dtype))
                else:
                    acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        _store_rows(acc, y_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, M, N, SPLIT, HAS_BIAS)

    @triton.jit
    def _split_sum_kernel(p_ptr, b_ptr, y_ptr, MN, N, S: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
        """``y = sum_s p[s] (+ bias)`` over the K splits, in split order, cast to ``y``'s dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(S):
            acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
