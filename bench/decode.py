"""Batch-1 decoding speed of SmolLM2-135M-Instruct: fp32 against packed W4 and W8 through qbayes.

Protocol: the first 64 tokens of wikitext-2 test as the prompt, 128 new tokens, greedy, with the
key/value cache (qbayes.generate); decode tokens/s = (new tokens - 1) / time after the first
token. fp32 and each quantized model (RTN, groups of 64, asymmetric, float16 scales; the solver
does not change the speed) are run in interleaved rounds in one process; reported: the median
over rounds. Embeddings and the tied lm_head stay in float, as quantize_ leaves them by default;
the last row packs lm_head too (quantize_(..., head=QuantSpec(8, 64, symmetric)), RTN).

    python bench/decode.py          # writes bench/results/decode.{json,md}
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from qbayes import QuantSpec, quantize_
from qbayes.data import EVAL_TEXT, data_path, tokenize_file
from qbayes.generate import generate
from qbayes.kernels import cpu as cpu_kernel
from qbayes.models import load_causal_lm, smollm2_135m

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def main(rounds: int = 3, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    fp32, tok = load_causal_lm(str(smollm2_135m()))
    prompt = tokenize_file(data_path(EVAL_TEXT), tok)[:64].unsqueeze(0)
    models = {"fp32": fp32}
    for b in (4, 8):
        m = copy.deepcopy(fp32)
        quantize_(m, QuantSpec(bits=b, group_size=64), method="rtn", float_dtype="float32", progress=False)
        models[f"W{b} g64"] = m
    # the tied lm_head (576 x 49152, 113 MB in fp32) is the largest single read per token
    m = copy.deepcopy(fp32)
    quantize_(m, QuantSpec(bits=4, group_size=64), method="rtn", float_dtype="float32", progress=False,
              head=QuantSpec(bits=8, group_size=64, symmetric=True))
    models["W4 g64 + lm_head W8"] = m
    speeds = {k: [] for k in models}
    texts = {}
    for _ in range(rounds):
        for k, m in models.items():
            g = generate(m, tok, prompt, 128, stop_at_eos=False)
            speeds[k].append(g.tokens_per_s)
            texts[k] = g.text
            print(f"{k}: {g.tokens_per_s:.2f} tokens/s", flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "cpu")
    rows = [{"model": k, "tokens_per_s": statistics.median(v), "runs": v,
             "speedup_vs_fp32": statistics.median(v) / statistics.median(speeds["fp32"])} for k, v in speeds.items()]
    res = {"machine": f"{cpu}, {os.cpu_count()} cores", "threads": threads, "torch": torch.__version__,
           "packed_kernel": cpu_kernel.available(), "rows": rows,
           "first_words": {k: t[:80] for k, t in texts.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["# Batch-1 decoding of SmolLM2-135M-Instruct (CPU)", "", __doc__.split("    python")[0].strip(), "",
             f"Machine: {res['machine']}; {threads} threads; torch {res['torch']}; packed kernel: {res['packed_kernel']}.", "",
             "| model | decode tokens/s (median) | × fp32 | runs |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tokens_per_s']:.2f} | {r['speedup_vs_fp32']:.2f} | "
                     + ", ".join(f"{v:.2f}" for v in r["runs"]) + " |")
    (RESULTS / "decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
