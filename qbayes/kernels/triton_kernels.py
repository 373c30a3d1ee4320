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

Where the code lives (this module is the public face; callers import from here):

* :mod:`.triton_base`: the optional Triton import, :func:`available`, :class:`Config`, layout
  checks, per-weight state;
* :mod:`.triton_tiles`: the device functions the kernels share;
* :mod:`.triton_gemv`: ``gemvg`` and ``gemv``; :mod:`.triton_gemm`: ``dotw``, ``dot`` and the
  split sum; :mod:`.triton_dequant`: :func:`dequant`;
* :mod:`.triton_qlinear`: the tuner, the heuristic and :func:`qlinear`.
"""
from __future__ import annotations

from .triton_base import Config, available, interpreted
from .triton_dequant import dequant
from .triton_qlinear import fastest_by_kind, qlinear, tuned_configs

__all__ = ["Config", "available", "dequant", "fastest_by_kind", "interpreted", "qlinear", "tuned_configs"]
