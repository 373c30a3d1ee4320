r"""Activation codes and per-row epilogues for the int8 layers, fused in one C++ pass where possible.

:func:`input_codes` turns a layer input into the integer codes its :class:`~qbayes.nn.ActQuant`
would produce, ``c = clamp(⌊x / s⌉ + z, 0, 2^b − 1)`` (``⌊·⌉`` half to even), with the quantizer's
``(s, z)`` — static, dynamic per-tensor or dynamic per-token (one range per row). The fused kernel
(``csrc/int8_cpu.cpp``, :func:`qbayes.kernels.cpu.int8_ops`) reads each row once for its range and
once, still in cache, for its codes, doing torch's float32 arithmetic step for step (true division,
round half to even, ``params_from_range``'s formulas), so its codes, scales and zero-points equal
the quantizer's bit for bit. Where the extension is unavailable (no compiler, ``QBAYES_KERNEL=reference``),
the input is not float32 on the CPU, or the quantizer carries state the kernel does not model, the
same codes come from torch ops (:func:`qbayes.kernels.int8.quantize_codes` on ``quant.params``).

:func:`row_epilogue` is the dequantize epilogue for per-row ``(s, z)``: from accumulators ``A₀``
computed with one shared zero-point ``z₀``, ``y = (A₀ − (z − z₀) Σ_k W_q) · s · s_w + b`` in one pass.
"""
from __future__ import annotations

import torch

from . import int8 as k8
from .cpu import int8_ops
from ..formats import params_from_range

_KNOWN = frozenset({"scale", "zero", "smooth"})  # ActQuant buffers the fused kernel models


def _ops():
    return int8_ops()


def available() -> bool:
    """Whether the fused C++ ops are built and usable here."""
    return _ops() is not None


def smoothed(quant, x: torch.Tensor) -> torch.Tensor:
    """What the quantizer quantizes, float32: ``x`` times SmoothQuant's per-channel factor, plus
    NoisyQuant's per-channel noise (each where the quantizer carries one)."""
    shape = [1] * x.dim()
    smooth, noise = getattr(quant, "smooth", None), getattr(quant, "noise", None)
    if smooth is not None:
        shape[quant.channel_axis % x.dim()] = smooth.numel()
        x = x * smooth.view(shape).to(x.dtype)
    x = x.float()
    if noise is not None:  # Q(x + N); the layer removes N W^T after the GEMM (Int8Linear/Int8Conv2d)
        shape[quant.channel_axis % x.dim()] = noise.numel()
        x = x + noise.view(shape).float()
    return x


def _fusable(quant, x: torch.Tensor) -> bool:
    """The fused kernel applies: float32 CPU input, an integer quantizer whose only state is
    ``scale``/``zero``/``smooth`` (anything else, e.g. a buffer added later, goes the torch way)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] == 0 or _ops() is None:
        return False
    extra = {n for n, b in quant.named_buffers(recurse=False) if b is not None} - _KNOWN
    return not extra and quant.spec.format == "int"


def _shifted(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``c`` as int8 ``c − 128`` (the same bytes with the top bit flipped)."""
    return codes.view(torch.int8).bitwise_xor_(-128) if codes.dtype == torch.uint8 else codes


def torch_input_codes(quant, x: torch.Tensor, shift: bool = False):
    """:func:`input_codes` with torch ops only (the quantizer's own ``params``; the reference)."""
    x2 = smoothed(quant, x).reshape(-1, x.shape[-1])
    s, z = quant.params(x2)
    codes = k8.quantize_codes(x2, s, z, quant.spec.bits)
    return (_shifted(codes) if shift else codes), s, z


def input_codes(quant, x: torch.Tensor, shift: bool = False, fused: bool = True):
    r"""Codes of the layer input ``x`` ``(..., K)`` as rows ``(M, K)``, with their ``(s, z)``.

    Returns ``(codes, s, z)``: ``codes`` uint8 ``c`` (int8 ``c − 128`` when ``shift``), ``s``/``z``
    float32, scalars for per-tensor ranges or ``(M, 1)`` for per-token ones, exactly the quantizer's
    ``params``. ``fused=False`` forces the torch-op path (same values).
    """
    spec = quant.spec
    if not (fused and _fusable(quant, x)):
        return torch_input_codes(quant, x, shift)
    mod, K = _ops(), x.shape[-1]
    smooth = getattr(quant, "smooth", None)
    if smooth is not None:
        smooth = smooth.to(torch.float32).contiguous()
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if spec.dynamic and spec.granularity == "per-token":
        if x2.shape[0] == 0:
            return torch_input_codes(quant, x, shift)
        return tuple(mod.quantize_rows(x2, smooth, spec.bits, spec.symmetric, shift))
    if smooth is not None:
        x2 = x2 * smooth
    if spec.dynamic:  # per-tensor: the range in one pass, then the quantizer's own formula
        if x2.numel() == 0:
            return torch_input_codes(quant, x, shift)
        lo, hi = (torch.tensor(v, dtype=torch.float32) for v in mod.tensor_minmax(x2))
        s, z = params_from_range(lo, hi, spec.bits, spec.symmetric, None)
    else:
        s, z = quant.params(x2)
        if s.dtype != torch.float32 or s.numel() != 1:  # x / s would not be a float32 division
            return torch_input_codes(quant, x, shift)
    return mod.quantize_tensor(x2, float(s), float(z), spec.bits, shift), s, z


def tensor_codes(quant, x: torch.Tensor, fused: bool = True):
    """Per-tensor codes of ``x`` in its own shape and layout (convolutions), with ``(s, z)``."""
    fusable = fused and _fusable(quant, x) and x.numel() > 0
    xs = smoothed(quant, x) if not fusable or getattr(quant, "smooth", None) is not None else x
    s, z = quant.params(xs)
    if fusable and s.dtype == torch.float32 and s.numel() == 1 and (
            xs.is_contiguous() or xs.is_contiguous(memory_format=torch.channels_last)):
        return _ops().quantize_tensor(xs, float(s), float(z), quant.spec.bits, False), s, z
    return k8.quantize_codes(xs, s, z, quant.spec.bits), s, z


def row_epilogue(acc: torch.Tensor, s: torch.Tensor, dz: torch.Tensor, colsum: torch.Tensor,
                 w_scale: torch.Tensor, bias: torch.Tensor | None, fused: bool = True) -> torch.Tensor:
    r"""``y = (A₀ − dz Σ_k W_q) · s · s_w + b``, float32 ``(M, N)``.

    ``acc`` ``A₀``: int32, or float32 holding the integer accumulators (overwritten); ``s`` ``(M,)``,
    ``(M, 1)`` or one float32 row scale; ``dz = z − z₀`` likewise, integer-valued; ``colsum`` int32 ``(N,)``;
    ``w_scale`` float32 ``(N,)``; ``bias`` float32 ``(N,)`` or None.
    """
    rows = acc.shape[0]
    s = s.reshape(-1).to(torch.float32).expand(rows).contiguous()
    dz = torch.as_tensor(dz).reshape(-1).to(torch.int32).expand(rows).contiguous()
    if fused and _ops() is not None and acc.is_contiguous():
        return _ops().row_epilogue(acc, s, dz, colsum, w_scale, bias)
    a = acc.to(torch.int64) - dz.to(torch.int64)[:, None] * colsum.to(torch.int64) if acc.dtype == torch.int32 \
        else acc.sub_(dz.to(torch.float32)[:, None] * colsum.to(torch.float32))
    y = a.to(torch.float32).mul_(s[:, None] * w_scale)
    return y if bias is None else y.add_(bias)
