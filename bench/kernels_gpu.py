"""Speed of the Triton packed-weight kernels against bf16 on a CUDA GPU.

Protocol: for each shape (K inputs, N outputs), bit-width (group size 64, asymmetric, float16
scales) and batch M, a random weight is quantized (RTN) into a QuantLinear on the GPU; timed
with CUDA events, in interleaved rounds (each round a loop of >= 20 ms after warm-up, median
over 7 rounds):

* ``bf16``: ``torch.nn.functional.linear`` with the bf16 weight (cuBLAS);
* ``qbayes``: ``QuantLinear.forward`` on bf16 activations (the path it picks: the fused Triton
  kernel up to 16 rows, Triton dequantize + cuBLAS above);
* ``dequant+mm``: the reference dequantization (torch ops) then cuBLAS, the baseline the issue
  asks qbayes never to lose to at batch 256.

Also checks each qbayes output against the float64 reference (relative error printed).

    python bench/kernels_gpu.py                 # appends the cuda rows to bench/results/kernels_gpu.{json,md}
    TRITON_INTERPRET=1 python bench/kernels_gpu.py --smoke   # tiny shapes on the CPU: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def time_cuda(fns: dict, rounds: int = 7, min_ms: float = 20.0) -> dict:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    loops = {}
    for k, f in fns.items():
        for _ in range(3):
            f()
        sync()
        t = _elapsed(f, 1)
        loops[k] = max(1, int(min_ms / max(t, 1e-3)))
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            per[k].append(_elapsed(f, loops[k]) / loops[k])
    return {k: statistics.median(v) for k, v in per.items()}


def _elapsed(f, n: int) -> float:
    if not torch.cuda.is_available():
        import time
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) * 1e3
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        f()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round, nothing written")
    ap.add_argument("--bits", default="4,8")
    args = ap.parse_args()
    from qbayes import QuantSpec
    from qbayes.algorithms.rtn import rtn
    from qbayes.kernels import dequantize_packed
    from qbayes.kernels import triton_kernels as tk
    from qbayes.nn import QuantLinear
    from qbayes.nn.quant_linear import GPU_KERNEL_MAX_ROWS

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not tk.available():
        sys.exit("no CUDA device and no Triton interpreter: nothing to time")
    shapes, batches, rounds = ([(128, 96)], (1, 20), 1) if args.smoke else (SHAPES, (1, 16, 256), 7)
    rows = []
    for K, N in shapes:
        w = torch.randn(N, K, generator=torch.Generator().manual_seed(K + N)) * K ** -0.5
        wb = w.to(dev, torch.bfloat16)
        for bits in (int(b) for b in args.bits.split(",")):
            spec = QuantSpec(bits=bits, group_size=64, clip="minmax")
            q = QuantLinear.from_quantized(rtn(w, None, spec), spec).to(dev)
            for M in batches:
                x = torch.randn(M, K, device=dev).to(torch.bfloat16)
                ref = x.double() @ q.dequantize().to(dev).double().T
                with torch.no_grad():
                    err = float(((q(x).double() - ref).abs().max() / ref.abs().max()))

                    def deq_mm(x=x, q=q):
                        return torch.nn.functional.linear(x, dequantize_packed(
                            q.qweight, q.scales, q.qzeros, bits, K, q.group_cols, torch.bfloat16))

                    t = time_cuda({"bf16": lambda x=x, wb=wb: torch.nn.functional.linear(x, wb),
                                   "qbayes": lambda x=x, q=q: q(x), "deq": deq_mm}, rounds=rounds,
                                  min_ms=1.0 if args.smoke else 20.0)
                row = {"device": "cuda" if dev == "cuda" else "cpu-interpreter", "bits": bits, "group_size": 64,
                       "K": K, "N": N, "batch": M, "ms": t["qbayes"], "bf16_ms": t["bf16"],
                       "speedup_vs_bf16": t["bf16"] / t["qbayes"], "dequant_mm_ms": t["deq"],
                       "speedup_vs_dequant_mm": t["deq"] / t["qbayes"], "rel_err_vs_float64": err,
                       "path": "fused Triton kernel" if M <= GPU_KERNEL_MAX_ROWS else "Triton dequantize + cuBLAS"}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.smoke:
        return
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernels_gpu.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["# Packed low-bit linear layers vs bf16 (GPU, Triton)", "", __doc__.split("    python")[0].strip(), "",
             f"Device: {res['device']}; torch {res['torch']}; Triton {res['triton']}.", "",
             "| K | N | bits | batch | bf16 (ms) | qbayes (ms) | × bf16 | dequant+mm (ms) | × dequant+mm | path |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['N']} | {r['bits']} | {r['batch']} | {r['bf16_ms']:.4f} | {r['ms']:.4f} | "
                     f"{r['speedup_vs_bf16']:.2f} | {r['dequant_mm_ms']:.4f} | {r['speedup_vs_dequant_mm']:.2f} | {r['path']} |")
    (RESULTS / "kernels_gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
