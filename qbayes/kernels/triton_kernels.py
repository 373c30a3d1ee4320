"""Triton kernels for packed 2..8-bit weights with group scales (GPU; CPU under Triton's interpreter).

The packed layout is qbayes's own (:mod:`qbayes.formats.packing`): the codes of a row form one
little-endian bit stream, code ``k`` at bit ``k * bits``, so a code is read from at most two
bytes for every width (3-bit codes straddle bytes, 2/4/8-bit ones never do). Weights are
``w = (c - z) s`` with float16 scales per group of input columns and packed zero-points (or the
symmetric ``2^(bits-1)``), computed in float32 exactly as the reference path computes them.

* :func:`qlinear`: ``y = x Wᵀ (+ b)`` reading the packed bytes directly, for few rows (decoding).
  The kernels below are optionally split along K (each split writes float32 partial sums that
  are added in a fixed order, so results are deterministic):

  - ``gemvg`` (one to four rows, the default there): steps of up to 16 words within one
    quantization group, the scale and zero-point loaded once per (row, step), codes turned into floats in place (three
    instructions per code: and, subtract, fused multiply-add) against activations the block first
    reorders into a scratch row; K splits are summed by the last slice to finish, so it is one
    launch. ``bench/sass_gemv.py`` counts its machine instructions on sm_90 without a GPU.
  - ``gemv``: 2/4/8-bit rows read as a (rows, words) tile of 32-bit words; for each code
    position one shift peels that code off every word (exponent trick: ``bits(2^23) | c`` is the
    float ``2^23 + c``, so no integer-to-float conversion) against the strided activations; the
    scale multiplies once per word. ``dotw``: the same words on the tensor cores, one ``tl.dot``
    per code position, for 2 to 16 rows.
  - ``dot``: any width 2..8, codes read byte by byte, ``tl.dot`` over a ``(BLOCK_K, BLOCK_N)``
    dequantized tile; float32 activations multiply in IEEE float32 (no TF32 rounding), float16 /
    bfloat16 ones on the tensor cores with the weight rounded to the activation dtype, which is
    what the reference path does for those dtypes.

  On a GPU the launch configuration is chosen by timing a short list of candidates on the first
  call for each (shape, bits, dtype, row count) and remembered for the process
  (``QBAYES_TRITON_TUNE=0``: a fixed heuristic instead). :func:`tuned_configs` lists the choices.
* :func:`dequant`: the dense weight in the activation dtype, for dequantize-then-matmul at
  large batches where the tensor cores' GEMM wins.

``TRITON_INTERPRET=1`` runs all of them on CPU tensors (how CI tests them); without a GPU and
without the interpreter :func:`available` is false and QuantLinear uses the other paths.
"""
from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: only CUDA machines (and the CI interpreter tests) need it
    triton = None
    tl = None


@functools.lru_cache(maxsize=1)
def interpreted() -> bool:
    """Triton's interpreter is on (read once: Triton itself reads it when it is imported)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a JIT function: slow to call from Python at every launch


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

    @triton.jit
    def _gemv_kernel(x_ptr, qw_ptr, sc_ptr, qz_ptr, b_ptr, y_ptr, N, K, G, GS, row_words, zrow_bytes, words_per_split,
                     BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        """One activation row (grid axis 2) times ``BLOCK_N`` weight rows over one K split (axis 1).

        ``qw_ptr`` is the packed weight viewed as int32 words, read as a (rows, words) tile; the
        ``i``-th code of every word is peeled off by one shift and multiplied by the activations
        ``x[word * PER + i]`` (a strided read of a vector that stays in L1), so every tile stays
        two-dimensional. With ``SPLIT`` the float32 partial sums go to ``y_ptr[split, row, n]``,
        else the finished row (bias added, cast) to ``y_ptr``."""
        PER: tl.constexpr = 32 // BITS
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_w = tl.arange(0, BLOCK_W)
        lo = pid_k * words_per_split
        hi = tl.minimum(lo + words_per_split, row_words)
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        for w0 in range(lo, hi, BLOCK_W):
            wi = w0 + offs_w
            w_mask = wi < hi
            words, s, zb = _word_tile(qw_ptr, sc_ptr, qz_ptr, offs_n[:, None], wi[None, :],
                                      n_mask[:, None] & w_mask[None, :], row_words, G, GS, zrow_bytes, BITS, HAS_ZERO)
            t = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
            for i in tl.static_range(PER):
                xi = tl.load(x_ptr + m * K + wi * PER + i, mask=w_mask, other=0.0).to(tl.float32)
                t += _code_minus_zero(words, zb, i, BITS) * xi[None, :]
            acc += t * s
        out = tl.sum(acc, axis=1)
        if SPLIT:
            tl.store(y_ptr + (pid_k * tl.num_programs(2) + m) * N + offs_n, out, mask=n_mask)
        else:
            if HAS_BIAS:
                out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + m * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _gemvg_kernel(x_ptr, qw_ptr, sc_ptr, qz_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, xs_ptr, N, K, G, row_words,
                      zrow_bytes, chunks_per_split, n_split, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, GW: tl.constexpr,
                      CW: tl.constexpr, XB: tl.constexpr, UNROLL: tl.constexpr):
        """Few activation rows (grid axis 2) times ``BLOCK_N`` weight rows, one chunk of ``CW``
        32-bit words per row per step (a power of two dividing the ``GW`` words of a quantization
        group), over one of ``n_split`` K slices (axis 1); one launch.

        * The block first writes its slice of the activations to a private scratch row in the order
          the loop reads them, as float32: position ``(h * HALF + j) * CW + w`` of a chunk holds
          ``x[w * PER + h * HALF + j] * 2^(-j BITS)``, so code ``j`` of half-word ``h`` of every
          word is one contiguous vector (Triton has no register shuffles to do this in place).
        * Codes are not shifted: ``half & (bits(2^23) | mask << j BITS)`` is the float
          ``2^23 + c 2^(j BITS)`` (the half-word was or-ed with ``bits(2^23)`` once), minus
          ``2^23 + z 2^(j BITS)`` it is ``(c - z) 2^(j BITS)`` exactly, and the scratch activation
          carries the ``2^(-j BITS)`` (a power of two: exact for activations above 2^-110): three
          instructions per code.
        * Scale and zero-point are loaded once per (row, chunk); a thread reads 4 words (16 bytes)
          of a row at a time, which keeps the per-row values in the tile's own layout.
        * With ``SPLIT`` (``n_split > 1``) each slice stores float32 partial sums and bumps a
          per-tile counter; the last slice to arrive adds the partials in slice order
          (deterministic), adds the bias, writes ``y`` and resets the counter for the next launch."""
        PER: tl.constexpr = 32 // BITS
        HALF: tl.constexpr = 16 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        CS: tl.constexpr = CW * PER
        W4: tl.constexpr = 4 if CW > 4 else CW
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        n_blocks = tl.num_programs(0)
        M = tl.num_programs(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_w = tl.arange(0, W4)
        c_lo = pid_k * chunks_per_split
        c_hi = tl.minimum(c_lo + chunks_per_split, row_words // CW)
        xs = xs_ptr + ((m * n_split + pid_k) * n_blocks + pid_n) * (chunks_per_split * CS)
        n_codes = (c_hi - c_lo) * CS
        for o0 in range(0, n_codes, XB):
            o = o0 + tl.arange(0, XB)
            r = o % CS
            q = r // CW
            v = tl.load(x_ptr + m * K + c_lo * CS + o - r + (r % CW) * PER + q, mask=o < n_codes, other=0.0)
            p2 = ((127 - (q % HALF) * BITS) << 23).to(tl.float32, bitcast=True)  # 2^(-j BITS), exactly
            tl.store(xs + o, v.to(tl.float32) * p2, mask=o < n_codes)
        tl.debug_barrier()  # the block's scratch row is written before any thread reads it
        acc = tl.zeros((BLOCK_N, W4), dtype=tl.float32)
        for c0 in range(c_lo, c_hi, UNROLL):
            for e in tl.static_range(UNROLL):  # UNROLL chunks' loads in flight per thread
                ch = c0 + e
                ok = n_mask & (offs_n * 0 + ch < c_hi)
                g = (ch * CW) // GW
                s = tl.load(sc_ptr + offs_n * G + g, mask=ok, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    zoff = g * BITS
                    zb = tl.load(qz_ptr + offs_n * zrow_bytes + zoff // 8, mask=ok, other=0)
                    z = ((zb.to(tl.int32) >> (zoff % 8)) & MASK).to(tl.float32)
                else:
                    z = tl.zeros((BLOCK_N,), dtype=tl.float32) + (1 << (BITS - 1)) * 1.0
                x_c = xs + (ch - c_lo) * CS
                t = tl.zeros((BLOCK_N, W4), dtype=tl.float32)
                for u in tl.static_range(CW // W4):
                    words = tl.load(qw_ptr + offs_n[:, None] * row_words + (ch * CW + u * W4) + offs_w[None, :],
                                    mask=ok[:, None], other=0)
                    for h in tl.static_range(2):
                        if h == 0:
                            half = (words & 0xFFFF) | 0x4B000000
                        else:
                            half = ((words >> 16) & 0xFFFF) | 0x4B000000
                        for j in tl.static_range(HALF):
                            xi = tl.load(x_c + (h * HALF + j) * CW + u * W4 + offs_w, mask=offs_w * 0 + ch < c_hi,
                                         other=0.0)
                            c = (half & (0x4B000000 | (MASK << (j * BITS)))).to(tl.float32, bitcast=True)
                            t += (c - (z * (1 << (j * BITS)) + 8388608.0)[:, None]) * xi[None, :]
                acc += t * s[:, None]
        out = tl.sum(acc, axis=1)
        if SPLIT:
            tl.store(part_ptr + (pid_k * M + m) * N + offs_n, out, mask=n_mask)
            cnt = cnt_ptr + m * n_blocks + pid_n
            if tl.atomic_add(cnt, 1, sem="acq_rel") == n_split - 1:  # every other slice has stored its sums
                out = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for k in range(n_split):
                    out += tl.load(part_ptr + (k * M + m) * N + offs_n, mask=n_mask, other=0.0,
                                   cache_modifier=".cg")
                if HAS_BIAS:
                    out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                tl.store(y_ptr + m * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
                tl.atomic_xchg(cnt, 0)
        else:
            if HAS_BIAS:
                out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + m * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)

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


@dataclass(frozen=True)
class Config:
    """A launch of :func:`qlinear`: ``kind`` "gemvg" (2/4/8 bits, whole words per group; it steps
    by the largest power of two up to 16 words that divides a group, whatever ``block_k``), "gemv" (32-bit
    word loads, 2/4/8 bits), "dotw" (the same words on the tensor cores) or "dot" (any width);
    ``block_k`` counts codes; ``split_k`` K slices (summed in slice order: by the last slice to
    finish for gemvg, by a second small kernel for the others). For gemvg ``num_stages`` is the
    number of groups per loop step (their loads in flight together); Triton does not pipeline
    those loads itself."""
    kind: str
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __str__(self) -> str:
        return (f"{self.kind} n{self.block_n} k{self.block_k} split{self.split_k} "
                f"w{self.num_warps} s{self.num_stages}")


def _word_ok(qweight, bits, in_features, group_cols) -> bool:
    """The gemv kernel reads whole 32-bit words of codes, each within one group."""
    return (bits in (2, 4, 8) and (in_features * bits) % 32 == 0 and group_cols % (32 // bits) == 0
            and qweight.data_ptr() % 4 == 0)


def _candidates(M, N, K, bits, word_ok, sms, group_cols) -> list[Config]:
    """What the tuner times on a GPU: the word kernels where the layout allows (gemvg and gemv for
    one to four rows, tensor-core ``dotw`` from two), the byte kernel otherwise, each with K splits
    sized so the grid covers the multiprocessors several times over."""
    out = []
    per = 32 // bits
    step = _chunk_words(group_cols * bits // 32) * per  # gemvg's codes per row per step

    def add(kind, bn, bk, warps, stages, max_split, cap):
        for split in (1, 2, 4, 8, 16, 32):
            progs = -(-N // bn) * split
            if split <= max_split and K // split >= bk and (split == 1 or progs <= cap * sms):
                out.append(Config(kind, bn, bk, split, warps, stages))
    if word_ok and M <= 4:
        # rows per thread = block_n / (32 warps): 1 or 2; K split into up to 32 slices
        # (each distinct configuration is one more compilation on a fresh machine: kept few)
        for bn, warps, unroll in ((128, 4, 1), (256, 4, 1), (256, 8, 1), (64, 2, 1), (128, 2, 1), (128, 4, 2)):
            add("gemvg", bn, step, warps, unroll, 32, 16)
    if word_ok:
        if M <= 4:  # the older word gemv: about three times gemvg's instructions per code on sm_90
            for bn, words, warps in ((32, 8, 4), (64, 16, 8), (16, 32, 4)):
                add("gemv", bn, words * per, warps, 2, 16, 16)
        if M >= 2:
            for bn, words, warps, stages in ((64, 16, 4, 3), (128, 16, 4, 3), (64, 32, 4, 3), (32, 32, 4, 3),
                                             (128, 32, 8, 3)):
                add("dotw", bn, words * per, warps, stages, 8, 8)
    if not word_ok or not out:
        for bn, bk, warps, stages in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (32, 128, 4, 4)):
            add("dot", bn, bk, warps, stages, 8, 8)
    return out


def _heuristic(M, N, K, bits, word_ok, sms, group_cols) -> Config:
    """The configuration without timing (the interpreter, ``QBAYES_TRITON_TUNE=0``)."""
    per = 32 // bits
    if M <= 4 and word_ok:
        bn = 32 if interpreted() else 128
        step = _chunk_words(group_cols * bits // 32) * per
        split = 1
        while -(-N // bn) * split < 8 * sms and K // (2 * split) >= step and split < 32:
            split *= 2
        return Config("gemvg", bn, step, split, 4 if bn >= 128 else 1, 1)
    kind, bn, bk = (("gemv", 32, 8 * per) if M <= 4 else ("dotw", 64, 16 * per)) if word_ok else ("dot", 64, 64)
    if interpreted():
        bn, bk = 32, (bk if word_ok else 32)
    split = 1
    while -(-N // bn) * split < 4 * sms and K // (2 * split) >= bk and split < 8:
        split *= 2
    return Config(kind, bn, bk, split)


_TUNED: dict = {}
# multiply-adds fused explicitly: Triton 3.10 turns the default off, and the gemvg loop counts on
# one FMA per code (the float32 tests allow for either rounding)
_FUSE = {"enable_fp_fusion": True}
_EXACT = {"enable_fp_fusion": False}  # dequantization: bit-identical to the reference's float32 ops


_TUNE_LOG: dict = {}


def tuned_configs() -> dict:
    """``{(torch.device, dtype, bits, has_zero, rows, N, K, group): Config}`` chosen so far in this process."""
    return dict(_TUNED)


def fastest_by_kind(key) -> dict:
    """``{kind: (config, microseconds)}``: the fastest configuration of each kernel kind the tuner
    timed for ``key`` (a key of :func:`tuned_configs`)."""
    best: dict = {}
    for c, ms in sorted(_TUNE_LOG.get(key, {}).items(), key=lambda kv: kv[1]):
        best.setdefault(c.kind, (str(c), round(ms * 1e3, 2)))
    return best


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(cfg: Config, x, qweight, scales, qzeros, bias, bits, in_features, group_cols, y):
    kw = {} if interpreted() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **_FUSE}
    if cfg.kind == "gemvg":
        return _launch_gemvg(cfg, x, qweight, scales, qzeros, bias, bits, group_cols, y, kw)
    M, K = x.shape
    N = qweight.shape[0]
    G = scales.shape[1]
    zrow = qzeros.shape[1] if qzeros is not None else 0
    qz = qzeros if qzeros is not None else qweight
    split = cfg.split_k > 1
    out = torch.empty(cfg.split_k, M, N, dtype=torch.float32, device=x.device) if split else y
    b = bias if bias is not None else y
    if cfg.kind in ("gemv", "dotw"):
        row_words = qweight.shape[1] // 4
        bw = cfg.block_k * bits // 32
        per_split = -(-row_words // cfg.split_k)
        per_split = -(-per_split // bw) * bw
        qw32 = _weight_state(qweight)["qw32"]
        common = dict(BITS=bits, HAS_ZERO=qzeros is not None, HAS_BIAS=bias is not None, SPLIT=split, **kw)
        if cfg.kind == "gemv":
            grid = (_cdiv(N, cfg.block_n), cfg.split_k, M)
            _gemv_kernel[grid](x, qw32, scales, qz, b, out, N, K, G, group_cols, row_words, zrow, per_split,
                               BLOCK_N=cfg.block_n, BLOCK_W=bw, **common)
        else:
            grid = (_cdiv(N, cfg.block_n), _cdiv(M, 16), cfg.split_k)
            half = x.dtype in (torch.float16, torch.bfloat16) and not interpreted()
            _dotw_kernel[grid](x, qw32, scales, qz, b, out, M, N, K, G, group_cols, row_words, zrow, per_split,
                               HALF_DOT=half, BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_W=bw, **common)
    else:
        use_dot = M >= 16 or not interpreted() and M >= 2
        half = x.dtype in (torch.float16, torch.bfloat16) and not interpreted()
        bm = 16 if use_dot else min(64, 1 << max(0, (M - 1).bit_length()))
        per_split = -(-K // cfg.split_k)
        per_split = -(-per_split // cfg.block_k) * cfg.block_k
        grid = (_cdiv(N, cfg.block_n), _cdiv(M, bm), cfg.split_k)
        _qlinear_kernel[grid](x, qweight, scales, qz, b, out, M, N, K, G, group_cols, qweight.shape[1], zrow,
                              per_split, BITS=bits, HAS_ZERO=qzeros is not None, HAS_BIAS=bias is not None,
                              USE_DOT=use_dot, HALF_DOT=half, SPLIT=split, BLOCK_M=bm, BLOCK_N=cfg.block_n,
                              BLOCK_K=cfg.block_k, **kw)
    if split:
        BLOCK = 1024
        _split_sum_kernel[(_cdiv(M * N, BLOCK),)](out, b, y, M * N, N, S=cfg.split_k,
                                                         HAS_BIAS=bias is not None, BLOCK=BLOCK, **kw)
    return y


_WEIGHTS: dict = {}


def _weight_state(qweight: torch.Tensor) -> dict:
    """Per packed weight (dropped with it): its int32 view, and the arrival counters of split
    gemvg launches (zeroed; each launch leaves them zero again). One counter buffer per weight,
    so launches of different layers may overlap (streams, graphs)."""
    key = id(qweight)
    entry = _WEIGHTS.get(key)
    if entry is not None and entry[0]() is qweight:
        return entry[1]
    state = {"qw32": qweight.view(torch.int32), "cnt": None}
    _WEIGHTS[key] = (weakref.ref(qweight, lambda _, key=key: _WEIGHTS.pop(key, None)), state)
    return state


def _counters(qweight: torch.Tensor, n: int) -> torch.Tensor:
    """Zeroed counters for ``n`` tiles: made outside any CUDA graph capture when possible (the
    tuner's eager first call), else inside the capture, which then owns them."""
    state = _weight_state(qweight)
    buf = state["cnt"]
    if buf is None or buf.numel() < n:
        buf = torch.zeros(n, dtype=torch.int32, device=qweight.device)
        if not (qweight.is_cuda and torch.cuda.is_current_stream_capturing()):
            state["cnt"] = buf
    return buf


def _chunk_words(group_words: int) -> int:
    """gemvg's step: the largest power of two up to 16 words dividing a group's words."""
    cw = 16
    while group_words % cw:
        cw //= 2
    return cw


def _launch_gemvg(cfg: Config, x, qweight, scales, qzeros, bias, bits, group_cols, y, kw):
    M, K = x.shape
    N = qweight.shape[0]
    G = scales.shape[1]
    row_words = qweight.shape[1] // 4
    gw = group_cols * bits // 32
    cw = _chunk_words(gw)
    chunks = row_words // cw
    split = max(1, min(cfg.split_k, chunks))
    per_split = -(-chunks // split)
    split = -(-chunks // per_split)  # no empty slices
    n_blocks = _cdiv(N, cfg.block_n)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    cnt = _counters(qweight, M * n_blocks) if split > 1 else y
    xs = torch.empty(M * split * n_blocks * per_split * cw * (32 // bits), dtype=torch.float32, device=x.device)
    _gemvg_kernel[(n_blocks, split, M)](x, _weight_state(qweight)["qw32"], scales,
                                         qzeros if qzeros is not None else qweight, bias if bias is not None else y,
                                         y, part, cnt, xs, N, K, G, row_words,
                                         qzeros.shape[1] if qzeros is not None else 0, per_split, split, BITS=bits,
                                         HAS_ZERO=qzeros is not None, HAS_BIAS=bias is not None, SPLIT=split > 1,
                                         BLOCK_N=cfg.block_n, GW=gw, CW=cw, XB=256, UNROLL=cfg.num_stages, **kw)
    return y


def _tune(key, cands, run) -> Config:
    from triton.testing import do_bench

    best, best_ms = None, float("inf")
    log = _TUNE_LOG[key] = {}
    for cfg in cands:
        try:
            ms = do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a configuration the compiler or the card refuses (shared memory): skip it
            continue
        log[cfg] = ms
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no Triton configuration ran for {key}")
    return best


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
            bias: torch.Tensor | None, bits: int, in_features: int, group_cols: int,
            config: Config | None = None) -> torch.Tensor:
    """``x (M, K) @ Wᵀ (+ bias)`` in ``x``'s dtype (float32 accumulation) from the packed weight.

    ``config`` forces a launch configuration (tests, benchmarks); by default it is tuned on a
    GPU (once per shape) and a heuristic under the interpreter."""
    _check(qweight, scales, qzeros, bits, in_features, group_cols)
    x = x.contiguous()
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    word_ok = _word_ok(qweight, bits, in_features, group_cols)
    if config is not None:
        if config.kind in ("gemvg", "gemv", "dotw") and not word_ok:
            raise ValueError(f"the {config.kind} kernel needs 2/4/8-bit codes in whole words (bits={bits}, K={K}, "
                             f"group size {group_cols})")
        return _launch(config, x, qweight, scales, qzeros, bias, bits, in_features, group_cols, y)
    rows = M if M <= 4 else 16 if M <= 16 else 64
    key = (x.device, x.dtype, bits, qzeros is not None, rows, N, K, group_cols)
    cfg = _TUNED.get(key)
    if cfg is None:
        sms = _sm_count(x.device)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()  # no timing inside a graph capture
        tune = (x.is_cuda and not interpreted() and os.environ.get("QBAYES_TRITON_TUNE", "1") != "0"
                and not capturing)
        cands = _candidates(M, N, K, bits, word_ok, sms, group_cols) if tune else []
        if cands:
            def run(c):
                return _launch(c, x, qweight, scales, qzeros, bias, bits, in_features, group_cols, y)
            cfg = _tune(key, cands, run)
        else:
            cfg = _heuristic(M, N, K, bits, word_ok, sms, group_cols)
        if not capturing:  # a heuristic chosen during a capture is not remembered: the next eager call tunes
            _TUNED[key] = cfg
    return _launch(cfg, x, qweight, scales, qzeros, bias, bits, in_features, group_cols, y)


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
