"""``qbayes bench-kernels``: packed low-bit linear layers timed on this machine (CPU against
fp32 and ONNX Runtime, or CUDA against bf16 cuBLAS)."""
from __future__ import annotations

from ..errors import QBayesError


def _bench_kernels(args) -> int:
    import torch

    from ..benchmarks.kernels_cpu import BIG, SMOL, run, table
    from ..kernels import cpu

    try:
        bits = tuple(int(b) for b in args.bits.split(","))
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise QBayesError("--bits and --batches take comma-separated integers") from None
    shapes = {"smollm2": SMOL, "large": BIG, "all": BIG + SMOL}[args.shapes]
    if args.device == "cuda":
        from ..benchmarks.kernels_gpu import run_cuda, table_cuda
        from ..kernels import triton_kernels as tk

        if not torch.cuda.is_available() or not tk.available():
            raise QBayesError("--device cuda needs a CUDA GPU and Triton")
        bad = [b for b in bits if not 2 <= b <= 8]
        if bad:
            raise QBayesError(f"the Triton kernels take bit-widths 2..8, not {bad}")
        print(f"{torch.cuda.get_device_name(0)}; Triton kernels tuned per shape in the warm-up")
        print(table_cuda(run_cuda(shapes, bits, batches, verbose=False)))
        return 0
    bad = [b for b in bits if b not in cpu.SUPPORTED_BITS]
    if bad:
        raise QBayesError(f"bench-kernels times bit-widths {cpu.SUPPORTED_BITS}, not {bad}")
    with_ort = not args.no_ort
    if with_ort:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print("onnxruntime is not installed: timing qbayes and fp32 only")
            with_ort = False
    print(f"packed CPU kernel: {'available' if cpu.available() else 'unavailable (reference path)'}; "
          f"{torch.get_num_threads()} threads")
    rows = run(shapes, bits, batches, threads=torch.get_num_threads(), with_ort=with_ort, verbose=False)
    print(table(rows))
    return 0
