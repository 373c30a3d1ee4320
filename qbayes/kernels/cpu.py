"""The CPU kernel for packed 2/3/4/8-bit weights (``csrc/qgemm_cpu.cpp``, AVX2 + FMA + F16C).

Built once with ``torch.utils.cpp_extension`` the first time it is needed (a C++ compiler is
required; about a minute) and cached under ``$QBAYES_CACHE/torch_extensions`` (default
``~/.cache/qbayes``). Where it cannot be built or the CPU lacks AVX2/FMA/F16C, :func:`available`
is false and callers use the reference path. ``QBAYES_KERNEL=reference`` turns it off.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process build lock
    fcntl = None

import torch

from ..paths import cache_dir
from ..errors import KernelError

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "qgemm_cpu.cpp"
DECODE_SOURCE = Path(__file__).with_name("csrc") / "decode_cpu.cpp"
INT8_SOURCE = Path(__file__).with_name("csrc") / "int8_cpu.cpp"
SUPPORTED_BITS = (2, 3, 4, 8)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _announce(build: Path, name: str, what: str) -> None:
    """Say so on stderr before a first build (about a minute of silence otherwise)."""
    if not (build / f"{name}.so").exists():
        print(f"qbayes: compiling the CPU {what} once (about a minute; cached in {build})", file=sys.stderr,
              flush=True)


def _build(name: str, source: Path, kind: str, what: str, **flags):
    """Build (or load the cached build of) one extension under ``$QBAYES_CACHE/torch_extensions``.

    torch guards a build folder with a ``lock`` file that a killed build leaves behind, and every
    later process then waits on it forever. qbayes builds under an ``flock`` instead (released by
    the kernel when its holder dies), and whoever holds it removes a leftover torch ``lock``: while
    the flock is held no other qbayes process is building there, so such a file is stale."""
    from torch.utils.cpp_extension import load

    build = cache_dir() / "torch_extensions" / f"{kind}_{torch.__version__.replace('+', '_')}"
    build.mkdir(parents=True, exist_ok=True)
    _announce(build, name, what)
    with open(build / "qbayes-build.flock", "w") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
            stale = build / "lock"
            if stale.exists():
                log.warning("removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
        return load(name=name, sources=[str(source)], build_directory=str(build), verbose=False, **flags)


@functools.lru_cache(maxsize=1)
def _module():
    if os.environ.get("QBAYES_KERNEL", "").lower() == "reference":
        return None
    if not {"avx2", "fma", "f16c"} <= _cpu_flags():
        log.info("CPU lacks AVX2/FMA/F16C: packed-weight kernel disabled, using the reference path")
        return None
    try:
        return _build("qbayes_qgemm_cpu", SOURCE, "qgemm_cpu", "packed-weight kernels",
                      extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, ...: the reference path still works
        log.warning("could not build the CPU packed-weight kernel (%s); using the reference path", e)
        return None


def available() -> bool:
    return _module() is not None


@functools.lru_cache(maxsize=1)
def decode_ops():
    """The fused float32 decode-step ops (``csrc/decode_cpu.cpp``: rmsnorm, add_rmsnorm_,
    rope_cache_, attn_decode), built on first use like the GEMM kernel; None where they cannot be
    built (callers then use torch ops)."""
    if os.environ.get("QBAYES_KERNEL", "").lower() == "reference":
        return None
    # reassociation lets the compiler vectorize the dot products and sums (no finite-math assumption:
    # the softmax starts from -inf)
    flags = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
    if {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    try:
        return _build("qbayes_decode_cpu", DECODE_SOURCE, "decode_cpu", "decode-step ops", extra_cflags=flags)
    except Exception as e:
        log.warning("could not build the CPU decode ops (%s); using torch ops", e)
        return None


@functools.lru_cache(maxsize=1)
def int8_ops():
    """The fused int8 activation-quantization and epilogue ops (``csrc/int8_cpu.cpp``, used by
    :mod:`qbayes.kernels.int8_quantize`), built on first use; None where they cannot be built."""
    if os.environ.get("QBAYES_KERNEL", "").lower() == "reference":
        return None
    # no fast-math and no FMA contraction: the codes must be torch's float32 arithmetic bit for bit
    flags = ["-O3", "-ffp-contract=off", "-fopenmp"] + (["-mavx2"] if "avx2" in _cpu_flags() else [])
    try:
        return _build("qbayes_int8_cpu", INT8_SOURCE, "int8_cpu", "int8 quantization ops", extra_cflags=flags,
                      extra_ldflags=["-fopenmp"])
    except Exception as e:
        log.warning("could not build the CPU int8 quantization ops (%s); using torch ops", e)
        return None


def supports(bits: int, in_features: int, group_cols: int, scale_dtype: torch.dtype) -> bool:
    """Whether the kernel handles this layout (else use the reference path)."""
    if bits not in SUPPORTED_BITS or scale_dtype != torch.float16:
        return False
    return group_cols % 32 == 0 and in_features % group_cols == 0


def dequant(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
            in_features: int, group_cols: int) -> torch.Tensor:
    """Dense float32 ``(out, in)`` weight, bit-identical to the reference dequantization."""
    mod = _module()
    if mod is None:
        raise KernelError("the CPU packed-weight kernel is not available (see qbayes.kernels.cpu.available())")
    return mod.dequant(qweight, scales, qzeros, bits, in_features, group_cols)


# Weight rows per tile (bench: 4096/14336 shapes at batch 256, tiles of 64..1024 rows): a small
# weight is dequantized whole (one GEMM, as F.linear); a large one in tiles of 512 rows, fewer
# for very wide inputs so the reused buffer stays under 32 MB.
WHOLE_FLOATS = 1 << 21
MAX_TILE_FLOATS = 1 << 23


def default_tile(out_features: int, in_features: int) -> int:
    """Weight rows per tile of :func:`qgemm_tiled`."""
    if out_features * in_features <= WHOLE_FLOATS:
        return out_features
    return max(128, min(512, MAX_TILE_FLOATS // in_features // 8 * 8))


def qgemm_tiled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                bits: int, group_cols: int, tile: int | None = None) -> torch.Tensor:
    """Many rows: dequantize ``tile`` weight rows at a time into a reused buffer, BLAS GEMM each."""
    mod = _module()
    if mod is None:
        raise KernelError("the CPU packed-weight kernel is not available (see qbayes.kernels.cpu.available())")
    if tile is None:
        tile = default_tile(qweight.shape[0], x.shape[-1])
    return mod.qgemm_tiled(x.contiguous(), qweight, scales, qzeros, bits, group_cols, tile)


def qgemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
          bits: int, group_cols: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (M, K) float32 @ W.T (+ bias)`` with ``W`` the packed weight; returns ``(M, N)`` float32."""
    mod = _module()
    if mod is None:
        raise KernelError("the CPU packed-weight kernel is not available (see qbayes.kernels.cpu.available())")
    if bias is not None and (bias.dtype not in (torch.float32, torch.float16) or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    return mod.qgemm(x.contiguous(), qweight, scales, qzeros, bits, group_cols, bias)
