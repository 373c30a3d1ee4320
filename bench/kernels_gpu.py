"""Speed of the Triton packed-weight kernels against bf16 on a CUDA GPU.

Protocol: for each shape (K inputs, N outputs), bit-width (group size 64, asymmetric, float16
scales) and batch M, a random weight is quantized (RTN) into a QuantLinear on the GPU. Three
ways to compute ``x Wᵀ`` on bf16 activations are timed:

* ``bf16``: ``torch.nn.functional.linear`` with the bf16 weight (cuBLAS);
* ``qbayes``: ``QuantLinear.forward`` (the path it picks: a tuned fused Triton kernel up to 16
  rows, Triton dequantize + cuBLAS above; the tuning runs in the warm-up, outside the timing);
* ``dequant+mm``: the reference dequantization (torch ops) then cuBLAS, the baseline the issue
  asks qbayes never to lose to at batch 256.

Each is captured in a CUDA graph of 24+ calls that cycle through enough copies of the weights
(>= 200 MB of them) that the 50-60 MB L2 cache cannot hold them, so every call reads its weight
from HBM as in a real model; graph replays are timed with CUDA events, median of 7 rounds (each
round >= 20 ms of replays) after warm-up, interleaved between the three. ``eager`` columns time
the same calls launched from Python without a graph (launch overhead included). Each qbayes
output is checked against the float64 product with the dequantized weight.

    python bench/kernels_gpu.py                 # writes bench/results/kernels_gpu.{json,md}, cuda rows of kernels.json
    TRITON_INTERPRET=1 python bench/kernels_gpu.py --smoke   # tiny shapes on the CPU: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

PROVENANCE = ("commit", "command", "date")
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round, nothing written")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--batches", default="1,16,256")
    args = ap.parse_args()
    from qbayes.kernels import triton_kernels as tk
    from qbayes.benchmarks.kernels_gpu import CUDA, run_cuda, table_cuda

    if not tk.available():
        sys.exit("no CUDA device and no Triton interpreter: nothing to time")
    bits = [int(b) for b in args.bits.split(",")]
    if args.smoke:
        run_cuda([(128, 96)], bits, (1, 20), rounds=1, min_ms=1.0, cache_bytes=1e5)
        return
    rows = run_cuda(SHAPES, bits, [int(b) for b in args.batches.split(",")])
    assert CUDA
    p = torch.cuda.get_device_properties(0)
    res = {"device": torch.cuda.get_device_name(0), "multiprocessors": p.multi_processor_count,
           "torch": torch.__version__, "triton": __import__("triton").__version__, "rows": rows}
    lines = ["# Packed low-bit linear layers vs bf16 (GPU, Triton)", "", __doc__.split("    python")[0].strip(), "",
             f"Device: {res['device']} ({res['multiprocessors']} SMs); torch {res['torch']}; Triton {res['triton']}.",
             "", table_cuda(rows), "",
             "Fastest configuration of each Triton kernel as the tuner timed it (``triton.testing.do_bench``: "
             "one weight copy, L2 flushed between calls, no graph; µs):", "",
             "| K | N | bits | batch | kernel | config | µs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for kind, (cfg, us) in (r.get("tuner_best_by_kernel_us") or {}).items():
            lines.append(f"| {r['K']} | {r['N']} | {r['bits']} | {r['batch']} | {kind} | {cfg} | {us} |")
    written = json.loads(write_results("kernels_gpu", res, "\n".join(lines) + "\n").read_text())
    kj = RESULTS / "kernels.json"
    if kj.exists():  # the one table: the cuda rows beside the cpu ones
        d = json.loads(kj.read_text())
        d["rows"] = [r for r in d["rows"] if r.get("device") != "cuda"] + rows
        # "cuda" carries this GPU run's commit and command; the file's own stay those of the CPU run
        d["cuda"] = {k: v for k, v in written.items() if k != "rows"}
        kept = {k: d[k] for k in PROVENANCE if k in d} or {"commit": "unknown", "command": "unknown"}
        write_results("kernels", d, provenance_of=kept)


if __name__ == "__main__":
    main()
