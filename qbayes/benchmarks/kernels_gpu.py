"""Timing of the packed-weight linear layers on a CUDA GPU against bf16 (``qbayes bench-kernels
--device cuda``, ``bench/kernels_gpu.py``).

For each shape (K inputs, N outputs), bit-width (group size 64, asymmetric, float16 scales) and
batch M, a random weight is quantized (RTN) into a QuantLinear on the GPU. Three ways to compute
``x Wᵀ`` on bf16 activations are timed: ``bf16`` (``F.linear``, cuBLAS), ``qbayes``
(``QuantLinear.forward``: the tuned fused Triton kernel up to 16 rows, Triton dequantize + cuBLAS
above; tuning happens in the warm-up) and ``dequant+mm`` (the reference torch-ops dequantization,
then cuBLAS). Each is captured in a CUDA graph of 24 calls cycling through enough copies of the
weights (>= ``cache_bytes``) that L2 cannot hold them; replays are timed with CUDA events, median
of ``rounds`` interleaved rounds of >= ``min_ms`` each; ``eager`` columns time the same calls
launched from Python. Without a GPU (Triton's interpreter) the same code runs on the CPU with
host timers, as a check that it runs.
"""
from __future__ import annotations

import copy
import math
import statistics
import sys
import time

import torch

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



def run_cuda(shapes, bits_list=(4, 8), batches=(1, 16, 256), rounds: int = 7, min_ms: float = 20.0,
             cache_bytes: float = 200e6, verbose: bool = True) -> list[dict]:
    """Rows ``{"device", "bits", "group_size", "K", "N", "batch", "ms", "bf16_ms", "speedup_vs_bf16", ...}``."""
    import json

    from ..algorithms.rtn import rtn
    from ..kernels import dequantize_packed
    from ..kernels import triton_kernels as tk
    from ..nn import QuantLinear
    from ..nn.quant_linear import GPU_KERNEL_MAX_ROWS
    from ..spec import QuantSpec

    dev = "cuda" if CUDA else "cpu"
    rows = []
    for K, N in shapes:
        w = torch.randn(N, K, generator=torch.Generator().manual_seed(K + N)) * K ** -0.5
        wb = w.to(dev, torch.bfloat16)
        wbs = [wb] + [wb.clone() for _ in range(max(1, math.ceil(cache_bytes / (wb.numel() * 2))) - 1)]
        for bits in bits_list:
            spec = QuantSpec(bits=bits, group_size=64, clip="minmax")
            q = QuantLinear.from_quantized(rtn(w, None, spec), spec).to(dev)
            qs = [q] + [copy.deepcopy(q) for _ in range(max(1, math.ceil(cache_bytes / q.storage_bytes())) - 1)]
            for M in batches:
                x = torch.randn(M, K, device=dev).to(torch.bfloat16)
                with torch.no_grad():
                    ref = x.double() @ q.dequantize().to(dev).double().T
                    out = q(x)  # the first call tunes the Triton configuration for this shape
                    err = float(((out.double() - ref).abs().max() / ref.abs().max()))
                    n_calls = 24

                    def deq_mm(q, x=x, bits=bits, K=K):
                        return torch.nn.functional.linear(x, dequantize_packed(
                            q.qweight, q.scales, q.qzeros, bits, K, q.group_cols, torch.bfloat16))

                    calls = {"bf16": [lambda wb=wbs[i % len(wbs)], x=x: torch.nn.functional.linear(x, wb)
                                      for i in range(n_calls)],
                             "qbayes": [lambda q=qs[i % len(qs)], x=x: q(x) for i in range(n_calls)],
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
                cfg, by_kind = None, {}
                if M <= GPU_KERNEL_MAX_ROWS:
                    key = next((key for key in tk.tuned_configs()
                                if key[1] == x.dtype and key[2] == bits and key[5] == N and key[6] == K
                                and key[4] == (M if M <= 4 else 16)), None)
                    if key is not None:
                        cfg = str(tk.tuned_configs()[key])
                        by_kind = tk.fastest_by_kind(key)
                row = {"device": "cuda" if CUDA else "cpu-interpreter", "bits": bits, "group_size": 64, "K": K,
                       "N": N, "batch": M, "ms": t["qbayes_graph"], "bf16_ms": t["bf16_graph"],
                       "speedup_vs_bf16": t["bf16_graph"] / t["qbayes_graph"], "dequant_mm_ms": t["deq_graph"],
                       "speedup_vs_dequant_mm": t["deq_graph"] / t["qbayes_graph"],
                       "eager_ms": t["qbayes_eager"], "bf16_eager_ms": t["bf16_eager"],
                       "dequant_mm_eager_ms": t["deq_eager"], "rel_err_vs_float64": err,
                       "weight_copies": [len(wbs), len(qs)],
                       "path": "fused Triton kernel" if M <= GPU_KERNEL_MAX_ROWS else "Triton dequantize + cuBLAS",
                       "config": cfg, "tuner_best_by_kernel_us": by_kind}
                rows.append(row)
                if verbose:
                    print(json.dumps(row), flush=True)
            del qs
        del wbs
        if CUDA:
            torch.cuda.empty_cache()
    return rows


def table_cuda(rows: list[dict]) -> str:
    """Markdown table of :func:`run_cuda` rows (times in microseconds)."""
    lines = ["| K | N | bits | batch | bf16 (µs) | qbayes (µs) | × bf16 | dequant+mm (µs) | × dequant+mm "
             "| eager bf16 / qbayes (µs) | path (config) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['N']} | {r['bits']} | {r['batch']} | {1e3 * r['bf16_ms']:.1f} | "
                     f"{1e3 * r['ms']:.1f} | {r['speedup_vs_bf16']:.2f} | {1e3 * r['dequant_mm_ms']:.1f} | "
                     f"{r['speedup_vs_dequant_mm']:.2f} | {1e3 * r['bf16_eager_ms']:.1f} / {1e3 * r['eager_ms']:.1f} | "
                     f"{r['path']}{' (' + r['config'] + ')' if r['config'] else ''} |")
    return "\n".join(lines)
