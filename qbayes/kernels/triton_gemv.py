"""The few-row (decoding) Triton kernels that read packed 2/4/8-bit codes as 32-bit words.

* ``_gemvg_kernel`` (one to four rows, the default there): steps of up to 16 words within one
  quantization group, codes turned into floats in place; K slices are summed by the last slice
  to finish, so it is one launch (:func:`_launch_gemvg`).
* ``_gemv_kernel``: a (rows, words) tile per step, one shift per code position against the
  strided activations; its K splits are summed by ``triton_gemm._split_sum_kernel``.

``bench/sass_gemv.py`` compiles both for sm_90 and counts their machine instructions per code.
"""
from __future__ import annotations

import torch

from .triton_base import Config, _cdiv, _chunk_words, _counters, _weight_state, tl, triton

if triton is not None:
    from .triton_tiles import _code_minus_zero, _word_tile

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
