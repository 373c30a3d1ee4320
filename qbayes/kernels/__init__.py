"""Matmuls on packed weights: :mod:`.reference` (torch ops, the ground truth, always available),
:mod:`.cpu` (the AVX2 C++ extension, built on first use) and the Triton kernels behind
:mod:`.triton_kernels` (GPU, or the CPU under Triton's interpreter). The package imports
nothing from qbayes but :mod:`qbayes.formats` and :mod:`qbayes.paths`; the benchmarks that
time it live in :mod:`qbayes.benchmarks`."""
from .reference import dequantize_packed, linear

__all__ = ["dequantize_packed", "linear"]
