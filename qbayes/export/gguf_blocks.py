"""qbayes packed weights as GGUF (llama.cpp) quantization blocks, without requantizing.

ggml's block formats (32 weights per block, row-major along the input):

* ``Q4_0``: ``{f16 d; u8 qs[16]}``, ``w = d (q - 8)``, ``qs[j] = q[j] | q[j + 16] << 4``;
* ``Q4_1``: ``{f16 d; f16 m; u8 qs[16]}``, ``w = d q + m``;
* ``Q8_0``: ``{f16 d; i8 qs[32]}``, ``w = d q``.

qbayes stores ``w = s (c - z)`` with a float16 scale ``s`` per group. So a symmetric 4-bit layer
in groups of 32 *is* ``Q4_0`` (``d = s``, ``q = c``, the zero-point 8) and a symmetric 8-bit one
is ``Q8_0`` (``q = c - 128``): bit-exact. An asymmetric 4-bit layer maps to ``Q4_1`` with
``m = -s z`` rounded to float16: exact only where ``s z`` is representable, so
:func:`to_gguf_blocks` reports the largest deviation it introduced.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import QBayesError
from ..formats import unpack

BLOCK = 32


def gguf_type_for(bits: int, group: int, symmetric: bool) -> str | None:
    """The ggml block type a layout maps onto without requantizing (``None`` if none does)."""
    if group != BLOCK:
        return None
    if bits == 4:
        return "Q4_0" if symmetric else "Q4_1"
    if bits == 8 and symmetric:
        return "Q8_0"
    return None


def to_gguf_blocks(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
                   in_features: int, group: int) -> tuple[str, np.ndarray, float]:
    """``(type name, uint8 array (rows, bytes per row), max |Δw| introduced)`` for one layer."""
    kind = gguf_type_for(bits, group, qzeros is None)
    if kind is None:
        raise QBayesError(f"no GGUF block type holds {bits}-bit codes in groups of {group} "
                          f"({'symmetric' if qzeros is None else 'asymmetric'}) without requantizing")
    rows = qweight.shape[0]
    nb = in_features // BLOCK
    codes = unpack(qweight, bits, in_features).reshape(rows, nb, BLOCK).numpy().astype(np.int16)
    d = scales.to(torch.float16).numpy().reshape(rows, nb, 1)
    dbytes = d.view(np.uint8).reshape(rows, nb, 2)
    err = 0.0
    if kind == "Q8_0":
        qs = (codes - 128).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([dbytes, qs], axis=2)
    else:
        nib = codes.astype(np.uint8)
        qs = nib[:, :, :16] | (nib[:, :, 16:] << 4)
        if kind == "Q4_0":
            blocks = np.concatenate([dbytes, qs], axis=2)
        else:
            z = unpack(qzeros, bits, nb).numpy().astype(np.float32).reshape(rows, nb, 1)
            exact = -d.astype(np.float32) * z
            m = exact.astype(np.float16)
            err = float(np.abs(m.astype(np.float32) - exact).max()) if m.size else 0.0
            blocks = np.concatenate([dbytes, m.view(np.uint8).reshape(rows, nb, 2), qs], axis=2)
    return kind, np.ascontiguousarray(blocks.reshape(rows, -1)), err
