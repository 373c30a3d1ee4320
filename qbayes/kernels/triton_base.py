"""What every Triton kernel module shares: the optional import of Triton, whether the kernels can
run here, the launch :class:`Config`, layout checks, and per-weight state.

Triton is optional (only CUDA machines and the CI interpreter tests need it): without it
``triton`` and ``tl`` are None here, the kernel modules define no kernels, and :func:`available`
is false. Nothing here imports another qbayes module.
"""
from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass

import torch

from ..errors import KernelError, QBayesError

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


def _check(qweight, scales, qzeros, bits, in_features, group_cols):
    if triton is None:
        raise KernelError("Triton is not installed")
    if not 2 <= bits <= 8:
        raise QBayesError(f"unsupported bit-width {bits}")
    if in_features % group_cols or scales.shape[1] != in_features // group_cols:
        raise QBayesError("scales do not match the group size: scales must be (out, in / group_size)")
    if not (qweight.is_contiguous() and scales.is_contiguous() and (qzeros is None or qzeros.is_contiguous())):
        raise QBayesError("packed tensors must be contiguous: call .contiguous() on qweight/scales/qzeros")


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


# multiply-adds fused explicitly: Triton 3.10 turns the default off, and the gemvg loop counts on
# one FMA per code (the float32 tests allow for either rounding)
_FUSE = {"enable_fp_fusion": True}
_EXACT = {"enable_fp_fusion": False}  # dequantization: bit-identical to the reference's float32 ops


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


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
