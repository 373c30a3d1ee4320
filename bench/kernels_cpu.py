"""Speed of linear layers with packed low-bit weights against fp32, on this machine's CPU.

Protocol: for each shape (K inputs, N outputs), bit-width (group size 64, asymmetric, float16
scales) and batch M, a random weight is quantized (RTN) into a QuantLinear; its forward (the
path QuantLinear picks at that batch: the packed CPU kernel for up to 8 rows, dequantized weight
tiles times the BLAS GEMM for more), torch.nn.functional.linear with the fp32 weight, and ONNX Runtime's MatMulNBits on
the same packed codes and scales are timed in interleaved rounds (each round times a loop long
enough to last >= 30 ms and records the per-call time); reported: the median over rounds.
Same process, same threads for torch and ONNX Runtime. 3-bit codes (which straddle bytes) have their
own kernel loop; ONNX Runtime's MatMulNBits has no 3-bit form.

    python bench/kernels_cpu.py            # writes bench/results/kernels.{json,md}
    python bench/kernels_cpu.py --quick    # SmolLM2 shapes only, printed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cpu_name, write_results  # noqa: E402

from qbayes.kernels import cpu as cpu_kernel  # noqa: E402
from qbayes.benchmarks.kernels_cpu import BIG, SMOL, run, table  # noqa: E402


def markdown(res: dict) -> str:
    return "\n".join(["# Packed low-bit linear layers vs fp32 (CPU)", "", __doc__.split("    python")[0].strip(), "",
                      f"Machine: {res['machine']}; {res['threads']} threads; torch {res['torch']}; "
                      f"ONNX Runtime {res['ort']}.", "", table([r for r in res["rows"] if r.get("device") != "cuda"])]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only; print, do not write results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", default="3,4,8", help="comma-separated bit-widths (default 3,4,8)")
    args = ap.parse_args()
    if not cpu_kernel.available():
        print("warning: the packed CPU kernel is unavailable here; timing the reference path")
    bits = tuple(int(b) for b in args.bits.split(","))
    rows = run(SMOL if args.quick else BIG + SMOL, bits_list=bits, threads=args.threads)
    if args.quick:
        return
    try:
        import onnxruntime
        ort_v = onnxruntime.__version__
    except ImportError:
        ort_v = "not installed"
    res = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "threads": args.threads, "torch": torch.__version__, "ort": ort_v,
           "rows": rows}
    old = RESULTS / "kernels.json"
    if old.exists():  # keep the GPU rows (bench/kernels_gpu.py), measured elsewhere; "cuda" holds their provenance
        prev = json.loads(old.read_text())
        res["rows"] += [r for r in prev.get("rows", []) if r.get("device") == "cuda"]
        if "cuda" in prev:
            res["cuda"] = prev["cuda"]
    write_results("kernels", res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
