"""Triton device functions shared by the kernels: reading codes from the packed bit stream
(byte-wise), dequantized weight tiles, 32-bit word tiles with their scales and zero-points, the
exact ``c - z`` of one code position of a word, and the storing of a result tile (finished or as
a K split's partial sums)."""
from __future__ import annotations

from .triton_base import tl, triton

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
    def _store_rows(acc, y_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, M, N, SPLIT: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
        """A ``(BLOCK_M, BLOCK_N)`` float32 result: to the split's partial sums ``y_ptr[pid_k]``, or
        finished (bias added, cast) to ``y_ptr``."""
        out_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT:
            tl.store(y_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=out_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _word_tile(qw_ptr, sc_ptr, qz_ptr, rows, wi, mask, row_words, G, GS, zrow_bytes, BITS: tl.constexpr,
                   HAS_ZERO: tl.constexpr):
        """Packed words at (row, word) (``rows``/``wi`` broadcast), their scales, and ``2^23 + z``."""
        PER: tl.constexpr = 32 // BITS
        words = tl.load(qw_ptr + rows * row_words + wi, mask=mask, other=0)
        g = (wi * PER) // GS
        s = tl.load(sc_ptr + rows * G + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zoff = g * BITS
            zb = tl.load(qz_ptr + rows * zrow_bytes + zoff // 8, mask=mask, other=0)
            z = ((zb.to(tl.int32) >> (zoff % 8)) & ((1 << BITS) - 1)).to(tl.float32)
        else:
            z = tl.zeros(words.shape, dtype=tl.float32) + (1 << (BITS - 1)) * 1.0
        return words, s, z + 8388608.0

    @triton.jit
    def _code_minus_zero(words, zb, i: tl.constexpr, BITS: tl.constexpr):
        """``c - z`` for the ``i``-th code of each word, exactly: ``bits(2^23) | c`` is the float ``2^23 + c``."""
        c = ((words >> (i * BITS)) & ((1 << BITS) - 1)) | 0x4B000000
        return c.to(tl.float32, bitcast=True) - zb
