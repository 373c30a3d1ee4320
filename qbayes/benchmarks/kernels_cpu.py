"""Timing of packed low-bit linear layers against fp32 (and ONNX Runtime's MatMulNBits on the
same packed codes), shared by ``qbayes bench-kernels`` and ``bench/kernels_cpu.py``.

Each contender is timed in interleaved rounds (a round times a loop long enough to last >= 30 ms
and records the per-call time); the median over rounds is reported.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from ..algorithms.rtn import rtn
from ..nn import QuantLinear
from ..nn.quant_linear import CPU_KERNEL_MAX_ROWS
from ..kernels import cpu as cpu_kernel
from ..spec import QuantSpec

BIG = [(4096, 4096), (4096, 14336), (14336, 4096)]
SMOL = [(576, 576), (576, 1536), (1536, 576)]


def timeit(fns: dict, rounds: int = 7, min_s: float = 0.03) -> dict:
    loops = {}
    for k, f in fns.items():  # warm-up and loop length
        f()
        t0 = time.perf_counter()
        f()
        loops[k] = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(loops[k]):
                f()
            per[k].append((time.perf_counter() - t0) / loops[k] * 1e3)
    return {k: statistics.median(v) for k, v in per.items()}


def ort_session(ql: QuantLinear, threads: int):
    """An ONNX Runtime MatMulNBits graph over the same packed codes, scales and zero-points."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    K, N, bits, g = ql.in_features, ql.out_features, ql.spec.bits, ql.group_cols
    kb = K // g
    B = ql.qweight.numpy().reshape(N, kb, g * bits // 8)
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(ql.scales.float().numpy().reshape(N, kb), "scales")]
    inputs = ["A", "B", "scales"]
    if ql.qzeros is not None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(ql.qzeros.numpy()).reshape(-1), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=g)
    graph = helper.make_graph([node], "qlinear", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # no busy-waiting threads after a run: they would steal the cores from the next contender
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(shapes, bits_list=(4, 8), batches=(1, 16, 256), threads: int = 2, with_ort: bool = True,
        verbose: bool = True) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for K, N in shapes:
        W = torch.randn(N, K, generator=torch.Generator().manual_seed(K * 7 + N))
        for bits in bits_list:
            spec = QuantSpec(bits=bits, group_size=64, clip="minmax")
            ql = QuantLinear.from_quantized(rtn(W, None, spec), spec)
            sess = None
            if with_ort:
                try:
                    sess = ort_session(ql, threads)
                except Exception as e:  # an ORT build without this bit-width
                    print(f"ONNX Runtime MatMulNBits {bits}-bit unavailable: {e}")
            for M in batches:
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
                xn = x.numpy()
                fns = {"fp32": lambda: torch.nn.functional.linear(x, W), "qbayes": lambda: ql(x)}
                if sess is not None:
                    fns["ort"] = lambda: sess.run(None, {"A": xn})
                with torch.no_grad():
                    t = timeit(fns)
                row = {"device": "cpu", "bits": bits, "group_size": 64, "K": K, "N": N, "batch": M, "ms": t["qbayes"],
                       "fp32_ms": t["fp32"], "speedup_vs_fp32": t["fp32"] / t["qbayes"],
                       "path": ("packed kernel" if M <= CPU_KERNEL_MAX_ROWS else "dequantized tiles x GEMM")
                       if cpu_kernel.available() else "reference"}
                if "ort" in t:
                    row.update(ort_ms=t["ort"], ort_speedup_vs_fp32=t["fp32"] / t["ort"])
                rows.append(row)
                if verbose:
                    print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of :func:`run` rows."""
    L = ["| K | N | bits | batch | fp32 (ms) | qbayes (ms) | × fp32 | path | ORT MatMulNBits (ms) | ORT × fp32 |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = (f"{r['ort_ms']:.3f} | {r['ort_speedup_vs_fp32']:.2f}" if "ort_ms" in r else "- | -")
        L.append(f"| {r['K']} | {r['N']} | {r['bits']} | {r['batch']} | {r['fp32_ms']:.3f} | {r['ms']:.3f} | "
                 f"{r['speedup_vs_fp32']:.2f} | {r['path']} | {o} |")
    return "\n".join(L)
