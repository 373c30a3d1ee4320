"""Real integer W8A8 execution on the CPU: qbayes's Int8Linear / Int8Conv2d against fp32 and torch's own int8 modules.

Protocol: random Gaussian weights are quantized to 8-bit symmetric per-output-channel codes (RTN, float32
scales) into a QuantLinear / QuantConv2d; an 8-bit asymmetric per-tensor activation quantizer is calibrated
(min-max) on 64 Gaussian rows (4 images for convolutions), or a dynamic per-token one is used; `qbayes.to_int8_`'s
modules are built from them. torch's own int8 modules (`torch.ao.nn.quantized.Linear` / `Conv2d`, engines
fbgemm and x86) get the *same* int8 weights, per-channel scales and input scale/zero-point. Every contender
is timed in interleaved rounds (a round times a loop lasting >= 30 ms and records the per-call time, after a
warm-up call); reported: the median over the rounds, same process, same thread count. "q→q" rows take an
already quantized input and return quantized output (the GEMM or convolution alone, the issue's baseline);
"float→float" rows include quantizing the input and dequantizing the output, as qbayes's modules do.
`max rel. diff` is max|y − y_fake| / max|y_fake| against the fake-quant simulation (QuantLinear/QuantConv2d +
ActQuant) on the timed input.

    python bench/int8.py            # writes bench/results/int8.{json,md}
    python bench/int8.py --quick    # the 4096x4096 batch-128 row and the first conv, printed only
    python bench/int8.py --out /tmp/r   # results written under /tmp/r instead
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.ao.nn.quantized as nnq
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import ROOT, machine, write_results  # noqa: E402

from qbayes.algorithms.rtn import rtn  # noqa: E402
from qbayes.benchmarks.kernels_cpu import timeit  # noqa: E402
from qbayes.kernels import int8 as k8  # noqa: E402
from qbayes.nn import Int8Conv2d, Int8Linear, QuantConv2d, QuantLinear  # noqa: E402
from qbayes.nn.act_quant import calibrate_input_quant  # noqa: E402
from qbayes.spec import ActSpec, QuantSpec  # noqa: E402

W8 = QuantSpec(bits=8, group_size=-1, symmetric=True, clip="minmax", scale_dtype="float32")
LINEARS = [(128, 4096, 4096), (16, 4096, 4096), (128, 4096, 14336), (128, 14336, 4096)]  # (M, K, N)
CONVS = [(64, 64, 64, 32, 1), (64, 128, 128, 16, 1), (64, 96, 96, 16, 96)]  # (batch, in, out, H=W, groups), 3x3 pad 1
ENGINES = ("fbgemm", "x86")
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")  # torch's own modules warn


_quantizer = calibrate_input_quant


def _rel(y, ref) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


def _ao_weight(int8_weight, w_scale):
    return torch._make_per_channel_quantized_tensor(int8_weight, w_scale.double(),
                                                    torch.zeros(w_scale.numel(), dtype=torch.int64), 0)


def _out_qparams(y):
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    s = (hi - lo) / 255
    return s, int(round(-lo / s))


def bench_linear(M, K, N, rounds):
    g = torch.Generator().manual_seed(K + N)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) / K ** 0.5)
    w, b = lin.weight.detach(), lin.bias.detach()
    qw = rtn(w, None, W8)
    x, calib = torch.randn(M, K, generator=g), torch.randn(64, K, generator=g)
    fake = _quantizer(QuantLinear.from_quantized(qw, W8, b, bias_dtype=torch.float32), ActSpec(8), calib)
    fake_tok = _quantizer(QuantLinear.from_quantized(qw, W8, b, bias_dtype=torch.float32),
                          ActSpec(8, "per-token", dynamic=True), calib)
    i8, i8_tok = Int8Linear.from_quant(fake), Int8Linear.from_quant(fake_tok)
    s, z = float(fake.input_quant.scale), int(fake.input_quant.zero)
    qx = torch.quantize_per_tensor(x, s, z, torch.quint8)
    with torch.no_grad():
        ref, ref_tok = fake(x), fake_tok(x)
    ys, yz = _out_qparams(ref)
    fns = {"fp32 F.linear": lambda: F.linear(x, w, b), "qbayes fake-quant (QuantLinear + ActQuant)": lambda: fake(x)}
    ao = {}
    for eng in ENGINES:
        torch.backends.quantized.engine = eng
        m = ao[eng] = nnq.Linear(K, N)
        m.set_weight_bias(_ao_weight(i8.weight, i8.w_scale), b)
        m.scale, m.zero_point = ys, yz
        fns[f"torch ao {eng} Linear, q→q"] = lambda m=m: m(qx)
        fns[f"torch ao {eng} Linear, float→float"] = (
            lambda m=m: m(torch.quantize_per_tensor(x, s, z, torch.quint8)).dequantize())
    xi8 = (qx.int_repr().to(torch.int16) - 128).to(torch.int8)
    wt = i8.weight.t().contiguous()
    if k8.int_mm_shapes_ok(M, K, N):
        fns["torch._int_mm (int8 codes → int32, GEMM only)"] = lambda: torch._int_mm(xi8, wt)
    fns["qbayes Int8Linear static per-tensor, float→float"] = lambda: i8(x)
    fns["qbayes Int8Linear dynamic per-token, float→float"] = lambda: i8_tok(x)
    others = {be: Int8Linear.from_quant(fake, be) for be in k8.LINEAR_BACKENDS[:3] if be != i8.backend and k8.exact(be)}
    for be, mod in others.items():
        fns[f"qbayes Int8Linear static per-tensor, float→float, backend={be}"] = lambda mod=mod: mod(x)
    with torch.no_grad():
        t = timeit(fns, rounds=rounds)
        diffs = {"qbayes Int8Linear static per-tensor, float→float": _rel(i8(x), ref),
                 "qbayes Int8Linear dynamic per-token, float→float": _rel(i8_tok(x), ref_tok)}
        for be, mod in others.items():
            diffs[f"qbayes Int8Linear static per-tensor, float→float, backend={be}"] = _rel(mod(x), ref)
        for eng in ENGINES:
            torch.backends.quantized.engine = eng
            diffs[f"torch ao {eng} Linear, float→float"] = _rel(
                ao[eng](torch.quantize_per_tensor(x, s, z, torch.quint8)).dequantize(), ref)
    return _rows("linear", f"Linear {K}→{N}, batch {M}", dict(M=M, K=K, N=N), t, diffs, i8.backend)


def bench_conv(B, C, O, H, groups, rounds):
    g = torch.Generator().manual_seed(C * O + H)
    torch.manual_seed(C * O + H)
    conv = nn.Conv2d(C, O, 3, padding=1, groups=groups)
    qw = rtn(conv.weight.detach().reshape(O, -1), None, W8)
    x, calib = torch.randn(B, C, H, H, generator=g), torch.randn(4, C, H, H, generator=g)
    xcl = x.contiguous(memory_format=torch.channels_last)
    fake = _quantizer(QuantConv2d.from_quantized(qw, W8, conv, bias_dtype=torch.float32), ActSpec(8), calib)
    ic = Int8Conv2d.from_quant(fake)
    s, z = float(fake.input_quant.scale), int(fake.input_quant.zero)
    w, b = conv.weight.detach(), conv.bias.detach()
    qx = torch.quantize_per_tensor(x, s, z, torch.quint8)
    with torch.no_grad():
        ref = fake(x)
    ys, yz = _out_qparams(ref)
    fns = {"fp32 F.conv2d (NCHW)": lambda: F.conv2d(x, w, b, 1, 1, 1, groups),
           "fp32 F.conv2d (channels-last)": lambda: F.conv2d(xcl, w, b, 1, 1, 1, groups),
           "qbayes fake-quant (QuantConv2d + ActQuant)": lambda: fake(x)}
    ao = {}
    for eng in ENGINES:
        torch.backends.quantized.engine = eng
        m = ao[eng] = nnq.Conv2d(C, O, 3, padding=1, groups=groups)
        m.set_weight_bias(_ao_weight(ic.weight, ic.w_scale), b)
        m.scale, m.zero_point = ys, yz
        fns[f"torch ao {eng} Conv2d, q→q"] = lambda m=m: m(qx)
        fns[f"torch ao {eng} Conv2d, float→float"] = (
            lambda m=m: m(torch.quantize_per_tensor(x, s, z, torch.quint8)).dequantize())
    fns["qbayes Int8Conv2d static per-tensor, float→float (NCHW in)"] = lambda: ic(x)
    fns["qbayes Int8Conv2d static per-tensor, float→float (channels-last in)"] = lambda: ic(xcl)
    with torch.no_grad():
        t = timeit(fns, rounds=rounds)
        diffs = {"qbayes Int8Conv2d static per-tensor, float→float (NCHW in)": _rel(ic(x), ref)}
        for eng in ENGINES:
            torch.backends.quantized.engine = eng
            diffs[f"torch ao {eng} Conv2d, float→float"] = _rel(
                ao[eng](torch.quantize_per_tensor(x, s, z, torch.quint8)).dequantize(), ref)
    label = f"Conv2d {C}→{O} 3×3{' depthwise' if groups == C else ''} on {H}×{H}, batch {B}"
    return _rows("conv", label, dict(batch=B, cin=C, cout=O, hw=H, groups=groups), t, diffs, ic.backend)


def _rows(kind, label, shape, t, diffs, backend):
    fp32 = next(v for k, v in t.items() if k.startswith("fp32"))
    base = t[f"torch ao fbgemm {'Linear' if kind == 'linear' else 'Conv2d'}, q→q"]
    return [{"kind": kind, "case": label, **shape, "contender": k, "ms": v, "x_fp32": fp32 / v, "x_fbgemm_qq": base / v,
             "max_rel_diff_vs_fake_quant": diffs.get(k),
             "qbayes_backend": (k.split("backend=")[1] if "backend=" in k else backend) if k.startswith("qbayes Int8") else None}
            for k, v in t.items()]


def _git() -> dict:
    def git(*a):
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
    return {"git_head": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def markdown(res: dict) -> str:
    L = ["# Real integer W8A8 execution on the CPU", "", __doc__.split("    python")[0].split("\n", 2)[2].strip(), "",
         f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores, AVX512-VNNI: {res['vnni']}); "
         f"torch.set_num_threads({res['threads']}); torch {res['machine']['torch']}; {res['rounds']} rounds; "
         f"load average before/after {res['loadavg_before']} / {res['loadavg_after']}. "
         f"Commit {res['git_head'][:12]}{' (dirty tree)' if res['dirty'] else ''}.", "",
         f"qbayes backends picked here (the fastest exact ones, `qbayes.kernels.int8.pick_backend`): linear "
         f"`{res['backend']['linear']}`, conv `{res['backend']['conv']}`. qbayes has no int8 GEMM of its own: "
         "Int8Linear runs oneDNN's int8 GEMM (`onednn::qlinear_pointwise`, float32 output, the dequantize epilogue "
         "and bias inside the kernel), the fastest maintained backend measured here (the `backend=` rows time the "
         "others on the same layer: fbgemm's float-output GEMM, `torch._int_mm` + the fused epilogue); Int8Conv2d "
         "runs oneDNN's int8 convolution (`onednn::qconv_pointwise`) on channels-last codes and returns "
         "channels-last output, as torch's own int8 convolutions do. The activation codes are computed by qbayes "
         "in one C++ pass (`qbayes.kernels.int8_quantize`: per row the range, then the scale and zero-point and "
         "`clamp(round(x / s) + z)`, with torch's float32 arithmetic step for step), so they equal the fake-quant "
         "ActQuant's bit for bit; per-token rows take the integer accumulators from oneDNN (one shared zero-point, "
         "unit scales) and apply the per-row scale and zero-point correction in one fused epilogue pass.", ""]
    for case in dict.fromkeys(r["case"] for r in res["rows"]):
        L += [f"## {case}", "", "| contender | ms | × fp32 | × torch ao fbgemm q→q | max rel. diff vs fake-quant |",
              "|---|---|---|---|---|"]
        for r in (r for r in res["rows"] if r["case"] == case):
            d = "-" if r["max_rel_diff_vs_fake_quant"] is None else f"{r['max_rel_diff_vs_fake_quant']:.1e}"
            L.append(f"| {r['contender']} | {r['ms']:.3f} | {r['x_fp32']:.2f} | {r['x_fbgemm_qq']:.2f} | {d} |")
        L.append("")
    a = res["acceptance"]
    L += ["## Acceptance (issue 14)", "",
          f"W8A8 Linear 4096×4096, batch 128: qbayes Int8Linear (static per-tensor, float→float, input quantization "
          f"included) {a['qbayes_ms']:.3f} ms vs torch ao fbgemm Linear q→q {a['fbgemm_ms']:.3f} ms in the same run: "
          f"{a['ratio']:.2f}× ({'met' if a['met'] else 'NOT met'}: at least as fast); against torch's own "
          f"float→float path (quantize_per_tensor → Linear → dequantize) {a['fbgemm_ff_ms']:.3f} ms: "
          f"{a['fbgemm_ff_ms'] / a['qbayes_ms']:.2f}×.", "",
          "Notes. The q→q baseline reads 8-bit codes and writes 8-bit codes; a float→float layer also reads the "
          "float32 input, quantizes it (exactly as the simulation rounds) and writes float32 output, which at "
          "this shape costs a few percent (≈ 0.1 ms of quantization plus fresh-memory traffic; oneDNN's GEMM on "
          "ready codes measured ≈ 5% faster than torch ao's q→q in separate runs). Repeated runs on this "
          "2-core machine (shared with other jobs: see the load averages) move these ratios by about ±4%. "
          "torch ao's float→float rows differ from the "
          "simulation by ~4e-3 because they requantize the output to 8 bits (qbayes's modules return float32); "
          "the `torch ao fbgemm` depthwise row's large difference is torch's, reported as measured.", ""]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="first linear and conv case only; print, do not write")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = ap.parse_args()
    if args.out is not None:
        common.RESULTS = args.out
    torch.set_num_threads(args.threads)
    engine = torch.backends.quantized.engine
    before = [round(v, 2) for v in os.getloadavg()]
    rows = []
    for shape in LINEARS[:1] if args.quick else LINEARS:
        rows += bench_linear(*shape, args.rounds)
        print(json.dumps(rows[-1]), flush=True)
    for shape in CONVS[:1] if args.quick else CONVS:
        rows += bench_conv(*shape, args.rounds)
        print(json.dumps(rows[-1]), flush=True)
    torch.backends.quantized.engine = engine
    head = [r for r in rows if r["kind"] == "linear" and (r["M"], r["K"], r["N"]) == LINEARS[0]]
    q = next(r for r in head if r["contender"].startswith("qbayes Int8Linear static"))
    fb = next(r for r in head if r["contender"] == "torch ao fbgemm Linear, q→q")
    fb_ff = next(r for r in head if r["contender"] == "torch ao fbgemm Linear, float→float")
    res = {**_git(), "machine": machine(args.threads), "threads": args.threads, "rounds": args.rounds,
           "vnni": k8.cpu_has_vnni(), "loadavg_before": before,
           "loadavg_after": [round(v, 2) for v in os.getloadavg()],
           "backend": {"linear": k8.pick_backend("linear"), "conv": k8.pick_backend("conv")},
           "acceptance": {"qbayes_ms": q["ms"], "fbgemm_ms": fb["ms"], "ratio": fb["ms"] / q["ms"],
                          "fbgemm_ff_ms": fb_ff["ms"],
                          "met": q["ms"] <= fb["ms"]}, "rows": rows}
    md = markdown(res)
    if not args.quick:
        write_results("int8", res, md)
    print(md)


if __name__ == "__main__":
    main()
