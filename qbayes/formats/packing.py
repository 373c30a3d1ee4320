"""Real bit packing of b-bit codes (b = 1..8) into bytes along the last dimension.

Codes are written little-endian into a bit stream: ``lcm(b, 8) / b`` codes fill
``lcm(b, 8) / 8`` bytes exactly (8 three-bit codes take 3 bytes), so a b-bit code costs
b bits on disk and in memory, up to padding of the last chunk of each row.
"""
from __future__ import annotations

import math

import torch

from ..errors import QBayesError


def _chunk(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk)."""
    if not 1 <= bits <= 8:
        raise QBayesError(f"cannot pack {bits}-bit codes: 1..8 bits are supported")
    l = math.lcm(bits, 8)
    return l // bits, l // 8


def packed_length(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits."""
    cpc, bpc = _chunk(bits)
    return -(-n // cpc) * bpc


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of an integer tensor of codes in ``[0, 2^bits)`` into uint8."""
    cpc, bpc = _chunk(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise QBayesError(f"codes out of range for {bits}-bit packing")
    *lead, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).clone()
    if 8 % bits == 0:  # whole codes per byte: stay in uint8
        c = codes.to(torch.uint8)
        pad = (-n) % cpc
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.reshape(*lead, (n + pad) // cpc, cpc)
        out = c[..., 0].clone()
        for j in range(1, cpc):
            out |= c[..., j] << (j * bits)
        return out
    pad = (-n) % cpc
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, (n + pad) // cpc, cpc)
    shifts = torch.arange(cpc, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # disjoint bit fields: sum == bitwise or
    byte_shifts = torch.arange(bpc, device=c.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.reshape(*lead, packed_length(n, bits)).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes of each row, as uint8."""
    cpc, bpc = _chunk(bits)
    *lead, m = packed.shape
    if m != packed_length(n, bits):
        raise QBayesError(f"packed row of {m} bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, m * cpc)[..., :n]
    wide = torch.int32 if cpc * bits < 32 else torch.int64
    p = packed.to(wide).reshape(*lead, m // bpc, bpc)
    word = p[..., :1].clone()
    for j in range(1, bpc):
        word |= p[..., j:j + 1] << (8 * j)
    shifts = torch.arange(cpc, device=p.device, dtype=wide) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, (m // bpc) * cpc)[..., :n].to(torch.uint8)
