"""``y = x Wᵀ (+ b)`` from packed weights with Triton: the choice of a launch configuration and
the launch itself.

On a GPU the configuration is chosen by timing a short list of candidates (:func:`_candidates`)
on the first call for each (shape, bits, dtype, row count) and remembered for the process;
under the interpreter, during a CUDA graph capture, or with ``QBAYES_TRITON_TUNE=0`` a fixed
heuristic (:func:`_heuristic`) is used. :func:`tuned_configs` and :func:`fastest_by_kind` report
the choices.
"""
from __future__ import annotations

import os

import torch

from .triton_base import (_FUSE, Config, _cdiv, _check, _chunk_words, _sm_count, _weight_state, _word_ok, interpreted,
                          triton)
from .triton_gemv import _launch_gemvg
from ..errors import KernelError, QBayesError

if triton is not None:
    from .triton_gemm import _dotw_kernel, _qlinear_kernel, _split_sum_kernel
    from .triton_gemv import _gemv_kernel


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
        raise KernelError(f"no Triton configuration ran for {key}")
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
            raise QBayesError(f"the {config.kind} kernel needs 2/4/8-bit codes in whole words (bits={bits}, K={K}, "
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
