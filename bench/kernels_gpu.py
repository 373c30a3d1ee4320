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
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
CUDA = torch.cuda.is_available()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _elapsed(f, n: int) -> float:
    """Milliseconds for ``n`` calls of ``f``."""
    if not CUDA:
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


def as_graph(calls: list, use_graph: bool):
    """One callable running ``calls`` in order: a CUDA graph replay, or the Python loop."""
    def loop():
        for c in calls:
            c()
    if not (use_graph and CUDA):
        return loop, len(calls)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loop()  # warm-up on the side stream, as capture requires
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loop()
    return g.replay, len(calls)


def time_interleaved(fns: dict, rounds: int, min_ms: float) -> dict:
    """Median milliseconds per call: ``fns`` maps a name to (callable, calls per invocation)."""
    loops = {}
    for k, (f, per) in fns.items():
        for _ in range(2):
            f()
        _sync()
        loops[k] = max(1, int(min_ms / max(_elapsed(f, 1), 1e-3)))
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, (f, per) in fns.items():
            out[k].append(_elapsed(f, loops[k]) / (loops[k] * per))
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round, nothing written")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--batches", default="1,16,256")
    args = ap.parse_args()
    from qbayes import QuantSpec
    from qbayes.algorithms.rtn import rtn
    from qbayes.kernels import dequantize_packed
    from qbayes.kernels import triton_kernels as tk
    from qbayes.nn import QuantLinear
    from qbayes.nn.quant_linear import GPU_KERNEL_MAX_ROWS

    dev = "cuda" if CUDA else "cpu"
    if not tk.available():
        sys.exit("no CUDA device and no Triton interpreter: nothing to time")
    batches = [int(b) for b in args.batches.split(",")]
    shapes, rounds, min_ms, cache = ([(128, 96)], 1, 1.0, 1e5) if args.smoke else (SHAPES, 7, 20.0, 200e6)
    if args.smoke:
        batches = [1, 20]
    rows = []
    torch.manual_seed(0)
    for K, N in shapes:
        w = torch.randn(N, K, generator=torch.Generator().manual_seed(K + N)) * K ** -0.5
        wb = w.to(dev, torch.bfloat16)
        wbs = [wb] + [wb.clone() for _ in range(max(1, math.ceil(cache / (wb.numel() * 2))) - 1)]
        for bits in (int(b) for b in args.bits.split(",")):
            spec = QuantSpec(bits=bits, group_size=64, clip="minmax")
            q = QuantLinear.from_quantized(rtn(w, None, spec), spec).to(dev)
            qs = [q] + [copy.deepcopy(q) for _ in range(max(1, math.ceil(cache / q.storage_bytes())) - 1)]
            for M in batches:
                x = torch.randn(M, K, device=dev).to(torch.bfloat16)
                with torch.no_grad():
                    ref = x.double() @ q.dequantize().to(dev).double().T
                    out = q(x)  # the first call tunes the Triton configuration for this shape
                    err = float(((out.double() - ref).abs().max() / ref.abs().max()))
                    n_calls = 24

                    def deq_mm(q):
                        return torch.nn.functional.linear(x, dequantize_packed(
                            q.qweight, q.scales, q.qzeros, bits, K, q.group_cols, torch.bfloat16))

                    calls = {"bf16": [lambda wb=wbs[i % len(wbs)]: torch.nn.functional.linear(x, wb)
                                      for i in range(n_calls)],
                             "qbayes": [lambda q=qs[i % len(qs)]: q(x) for i in range(n_calls)],
                             "deq": [lambda q=qs[i % len(qs)]: deq_mm(q) for i in range(n_calls)]}
                    t = {}
                    for mode in ("graph", "eager"):
                        fns = {}
                        for k, c in calls.items():
                            try:
                                fns[k] = as_graph(c, mode == "graph")
                            except Exception as e:  # a path that cannot be captured: time it eagerly
                                print(f"# {k}: no CUDA graph ({e}); timed eagerly", file=sys.stderr)
                                fns[k] = as_graph(c, False)
                        for k, v in time_interleaved(fns, rounds, min_ms).items():
                            t[f"{k}_{mode}"] = v
                cfg = None
                if M <= GPU_KERNEL_MAX_ROWS:
                    cfg = next((str(c) for key, c in tk.tuned_configs().items()
                                if key[1] == x.dtype and key[2] == bits and key[5] == N and key[6] == K
                                and key[4] == (M if M <= 4 else 16)), None)
                row = {"device": "cuda" if CUDA else "cpu-interpreter", "bits": bits, "group_size": 64, "K": K, "N": N,
                       "batch": M, "ms": t["qbayes_graph"], "bf16_ms": t["bf16_graph"],
                       "speedup_vs_bf16": t["bf16_graph"] / t["qbayes_graph"], "dequant_mm_ms": t["deq_graph"],
                       "speedup_vs_dequant_mm": t["deq_graph"] / t["qbayes_graph"],
                       "eager_ms": t["qbayes_eager"], "bf16_eager_ms": t["bf16_eager"],
                       "dequant_mm_eager_ms": t["deq_eager"], "rel_err_vs_float64": err,
                       "weight_copies": [len(wbs), len(qs)],
                       "path": "fused Triton kernel" if M <= GPU_KERNEL_MAX_ROWS else "Triton dequantize + cuBLAS",
                       "config": cfg}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del qs
        del wbs
        if CUDA:
            torch.cuda.empty_cache()
    if args.smoke:
        return
    p = torch.cuda.get_device_properties(0)
    res = {"device": torch.cuda.get_device_name(0), "multiprocessors": p.multi_processor_count,
           "torch": torch.__version__, "triton": __import__("triton").__version__, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernels_gpu.json").write_text(json.dumps(res, indent=1) + "\n")
    kj = RESULTS / "kernels.json"
    if kj.exists():  # the one table: the cuda rows beside the cpu ones
        d = json.loads(kj.read_text())
        d["rows"] = [r for r in d["rows"] if r.get("device") != "cuda"] + rows
        d["cuda"] = {k: v for k, v in res.items() if k != "rows"}
        kj.write_text(json.dumps(d, indent=1) + "\n")
    lines = ["# Packed low-bit linear layers vs bf16 (GPU, Triton)", "", __doc__.split("    python")[0].strip(), "",
             f"Device: {res['device']} ({res['multiprocessors']} SMs); torch {res['torch']}; Triton {res['triton']}.",
             "", "| K | N | bits | batch | bf16 (µs) | qbayes (µs) | × bf16 | dequant+mm (µs) | × dequant+mm "
             "| eager bf16 / qbayes (µs) | path (config) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['N']} | {r['bits']} | {r['batch']} | {1e3 * r['bf16_ms']:.1f} | "
                     f"{1e3 * r['ms']:.1f} | {r['speedup_vs_bf16']:.2f} | {1e3 * r['dequant_mm_ms']:.1f} | "
                     f"{r['speedup_vs_dequant_mm']:.2f} | {1e3 * r['bf16_eager_ms']:.1f} / {1e3 * r['eager_ms']:.1f} | "
                     f"{r['path']}{' (' + r['config'] + ')' if r['config'] else ''} |")
    (RESULTS / "kernels_gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
