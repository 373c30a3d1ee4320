"""Timing harnesses behind ``qbayes bench-kernels`` and the scripts in ``bench/``.

They build quantized layers (``algorithms``, ``nn``) to time the ``kernels`` under them, so they
sit above all three in the package's layering rather than inside ``kernels/``:

* :mod:`.kernels_cpu`: packed low-bit linear layers against fp32 and ONNX Runtime's MatMulNBits;
* :mod:`.kernels_gpu`: the Triton kernels against bf16 cuBLAS and dequantize-then-matmul, in
  CUDA graphs.

Submodules are imported on use (``from qbayes.benchmarks.kernels_cpu import run``).
"""
