"""README blocks of the speed benchmarks: CPU kernels, whole-model decoding and the GPU kernels (each
function renders one block of bench/readme.py)."""
from __future__ import annotations

import statistics

from readme_text import all_passed, para, rng


# ----- CPU kernels and decoding (bench/kernels_cpu.py, bench/decode.py) ----------------------------

def _machine_str(s: str) -> tuple[str, int]:
    """('AMD EPYC', 2) from 'AMD EPYC, 2 cores'."""
    cpu, cores = s.rsplit(", ", 1)
    return cpu, int(cores.split()[0])


def _cpu_rows(res: dict) -> list[dict]:
    return [r for r in res["rows"] if r.get("device", "cpu") == "cpu"]


def kernels(res: dict) -> str:
    cpu, cores = _machine_str(res["machine"])
    big = [r for r in _cpu_rows(res) if max(r["K"], r["N"]) >= 4096]
    cell = {(r["K"], r["N"], r["bits"], r["batch"]): r for r in big}

    def x(K, N, bits, batch, key="speedup_vs_fp32"):
        r = cell.get((K, N, bits, batch))
        return "-" if r is None or key not in r else f"{r[key]:.2f}"

    lines = [para(f"Linear layers on this {cores}-core AVX2 machine ({cpu}, {res['threads']} threads, group "
                  f"{rng([r['group_size'] for r in big], 'd')} asymmetric; median of 7 interleaved rounds; fp32 "
                  f"`F.linear` and ONNX Runtime {res['ort']}'s MatMulNBits on the same packed bytes timed in the "
                  "same run; `QuantLinear.forward` picks the path: the packed kernel up to 8 rows, dequantized "
                  "weight tiles × the BLAS GEMM above):"),
             "",
             "| K × N | 4-bit × fp32, batch 1 | ORT 4-bit, batch 1 | 8-bit × fp32, batch 1 | 4-bit, batch 16 / 256 "
             "| 8-bit, batch 16 / 256 |",
             "|---|---|---|---|---|---|"]
    for K, N in dict.fromkeys((r["K"], r["N"]) for r in big):
        lines.append(f"| {K} × {N} | {x(K, N, 4, 1)} | {x(K, N, 4, 1, 'ort_speedup_vs_fp32')} | {x(K, N, 8, 1)} | "
                     f"{x(K, N, 4, 16)} / {x(K, N, 4, 256)} | {x(K, N, 8, 16)} / {x(K, N, 8, 256)} |")
    return "\n".join(lines)


def kernels_smollm2(res: dict) -> str:
    small = [r for r in _cpu_rows(res) if max(r["K"], r["N"]) < 4096]
    dims = "/".join(str(d) for d in sorted({d for r in small for d in (r["K"], r["N"])}))
    many = sorted({r["batch"] for r in small if r["batch"] > 1})
    return para(f"SmolLM2's own shapes ({dims}, cache-resident in fp32) run at "
                f"{rng([r['speedup_vs_fp32'] for r in small if r['batch'] == 1])}× fp32 at batch 1 and "
                f"{rng([r['speedup_vs_fp32'] for r in small if r['batch'] > 1])}× at batches "
                f"{' and '.join(map(str, many))}, where dequantizing costs as much as the small fp32 GEMM.")


def kernels_3bit(res: dict) -> str:
    """The 3-bit kernel against 4-bit codes, at batch 1 on the large shapes of the same run."""
    big = [r for r in _cpu_rows(res) if max(r["K"], r["N"]) >= 4096 and r["batch"] == 1]
    three, four = [r["speedup_vs_fp32"] for r in big if r["bits"] == 3], [r["speedup_vs_fp32"] for r in big if r["bits"] == 4]
    if not three:
        return para("3-bit codes, which straddle bytes, have their own decode loop; no results file records "
                    "its speed yet (`python bench/kernels_cpu.py --bits 3,4,8`).")
    return para("3-bit codes, which straddle bytes, have their own decode loop (blocks of 64 codes: one byte shuffle "
                "puts each 24-bit octet in a lane, immediate shifts peel the codes off, and x is permuted once per "
                f"call to meet them): {rng(three)}× fp32 at batch 1 on the large shapes, against {rng(four)}× for "
                "4-bit codes in the same run.")


DECODE_ORT = {"W4 g64": "MatMulNBits", "W8 g64": "DequantizeLinear + MatMul"}


def decode(res: dict) -> str:
    rows = res["rows"]
    cell = {(r["model"], r["engine"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    rounds = statistics.median(len(r["runs"]) for r in rows)
    spread = max(abs(x / r["tokens_per_s"] - 1) for r in rows for x in r["runs"])
    lines = [para("Whole-model decoding of SmolLM2-135M (64-token prompt, 128 new tokens, greedy, KV cache; median "
                  f"of {rounds:.0f} interleaved rounds, whose runs differ from their median by up to "
                  f"{100 * spread:.0f} % here; `bench/results/decode.md`):"),
             "",
             "| model | HF forward loop | qbayes decoder | × fp32 (qbayes loop) | ONNX Runtime (decode-step graph) |",
             "|---|---|---|---|---|"]
    for i, m in enumerate(models):
        hf, qb, ort = cell.get((m, "hf")), cell[m, "qbayes"], cell.get((m, "onnxruntime"))
        x = f"{qb['speedup_vs_fp32']:.2f}"
        x = f"**{x}**" if m.startswith("W4") else x
        o = "–" if ort is None else f"{ort['tokens_per_s']:.1f}" + (f" ({DECODE_ORT[m]})" if m in DECODE_ORT else "")
        h = "–" if hf is None else f"{hf['tokens_per_s']:.1f}" + (" tokens/s" if i == 0 else "")
        lines.append(f"| {m.replace('lm_head', '`lm_head`')} | {h} | {qb['tokens_per_s']:.1f} | {x} | {o} |")
    gap = [1000 / cell[m, "hf"]["tokens_per_s"] - 1000 / cell[m, "qbayes"]["tokens_per_s"]
           for m in models if (m, "hf") in cell]
    same = ("gives the same greedy text as the HF loop for every model here"
            if all(res["same_text_both_loops"].values())
            else "does NOT give the same greedy text as the HF loop for every model (see decode.json)")
    head = cell["W4 g64 + lm_head W8", "qbayes"]["speedup_vs_fp32"]
    w4_ort, w4_qb = cell["W4 g64", "onnxruntime"]["tokens_per_s"], cell["W4 g64", "qbayes"]["tokens_per_s"]
    ort_same = ("its tokens equal qbayes's" if all(res["onnxruntime_same_text_as_qbayes"].values())
                else "its tokens do NOT all equal qbayes's")
    lines += ["", para(
        "In Hugging Face's eager forward the per-layer Python and small ops (the HF loop takes "
        f"{rng(gap, '.0f')} ms more per token than qbayes's) hid most of what packing buys; qbayes's decoder "
        "(`qbayes.fastdecode`, used by `generate` and `qbayes generate` for Llama-architecture models) fuses q/k/v "
        "and gate/up into one packed layer each, keeps a static cache and replaces norms, rotary embedding and "
        f"single-query attention with small C++ ops, and {same}. The tied fp32 `lm_head` (113 MB per token) is "
        "then the largest read of the W4 model; packing it at 8 bits (`head=QuantSpec(8, 64, symmetric=True)`, "
        f"`--head-bits 8`) gives {head:.1f}×. ONNX Runtime runs the exported decode-step graph (`qbayes export "
        f"--kv-cache`) {_compare(w4_ort, w4_qb)} for W4 ({w4_ort:.1f} against {w4_qb:.1f} tokens/s), and "
        f"slowly wherever a layer is 8-bit (it dequantizes those weights at every step); {ort_same}. Tables: "
        "`bench/results/kernels.md`, `bench/results/decode.md`.")]
    return "\n".join(lines)


def _compare(a: float, b: float) -> str:
    """How speed ``a`` compares with qbayes's ``b``, in words that stay true when the numbers move."""
    r = a / b
    if abs(r - 1) <= 0.1:
        return "at about the same speed as qbayes"
    return f"{r:.2f}× as fast as qbayes" if r > 1 else f"at {r:.2f}× qbayes's speed"


# ----- GPU kernels (bench/kernels_gpu.py, bench/sass_gemv.py) -----------------------------------

def _packed_bytes(K: int, N: int, bits: int, group: int) -> float:
    """Codes, float16 scales and ``bits``-bit zero-points of one K × N weight (bench/sass_gemv.py's count)."""
    return K * N * bits / 8 + K * N / group * 2 + K * N / group * bits / 8


def kernels_gpu(res: dict, sass: dict) -> str:
    rows = res["rows"]
    K, N = sass["meta"]["shape"]
    one = next(r for r in rows if (r["K"], r["N"], r["bits"], r["batch"]) == (K, N, 4, 1))
    bf16_bandwidth = K * N * 2 / (one["bf16_ms"] * 1e-3)
    w4_us = _packed_bytes(K, N, 4, one["group_size"]) / bf16_bandwidth * 1e6
    tests = res.get("gpu_tests", {})
    ok = "GPU tests pass" if tests and all(all_passed(v) for v in tests.values()) else "GPU tests NOT all passing"
    err = f"{max(r['rel_err_vs_float64'] for r in rows):.1e}".replace("e-0", "e-")
    deq = {b: [r["speedup_vs_dequant_mm"] for r in rows if r["batch"] == b] for b in (1, 16, 256)}
    vs = {b: [r["speedup_vs_bf16"] for r in rows if r["batch"] == b] for b in (1, 16, 256)}
    slower = ("but **slower than bf16 cuBLAS**" if max(r["speedup_vs_bf16"] for r in rows) < 1
              else "and against bf16 cuBLAS")
    g = [r for r in sass["rows"] if r["kernel"] == "gemvg" and r["bits"] == 4]
    return para(
        f"On CUDA, `QuantLinear` runs Triton kernels, tuned per shape on first use. One lent {res['device']} run "
        "(`bash bench/gpu_session.sh`; CUDA graphs over weight copies larger than L2; `bench/results/kernels_gpu.md`) "
        f"measured the first version of those kernels: correct ({ok}; bf16 outputs within {err} of float64) and "
        f"{rng(deq[1] + deq[256], '.1f')}× faster than dequantize-then-matmul in torch ops at batches 1 and 256 "
        f"({rng(deq[16], '.1f')}× at batch 16), {slower}: {one['speedup_vs_bf16']:.2f}× at batch 1 on {K}×{N} "
        f"({one['ms'] * 1e3:.1f} µs against {one['bf16_ms'] * 1e3:.1f}; the 4-bit weight alone would take about "
        f"{w4_us:.0f} µs at the bandwidth bf16 reached), {rng(vs[16])}× at batch 16, {rng(vs[256])}× at batch 256. "
        "The kernels were then rewritten, guided by their machine code for sm_90 counted without a GPU "
        "(`bench/sass_gemv.py`, `bench/results/sass_gemv.md`): the batch-1 kernel now steps one quantization group "
        "at a time and turns codes into floats in place, "
        f"{rng([r['instructions_per_code'] for r in g], '.1f')} instructions per 4-bit weight code, far fewer than "
        "in the measured version (`bench/NOTES_gpu.md`), for an issue floor of "
        f"{rng([r['issue_us_4096x14336'] for r in g], '.1f')} µs on that shape against "
        f"{rng([r['dram_us_4096x14336'] for r in g], '.1f')} µs for the 4-bit bytes at {sass['meta']['dram_tb_s']} "
        "TB/s, in one launch with K slices summed deterministically; 2–16 rows use tensor-core `dotw`. They pass "
        "the interpreter tests and compile for sm_90, and await the next GPU session for their numbers "
        "(`bench/NOTES_gpu.md`).")
