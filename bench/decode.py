"""Batch-1 decoding speed of SmolLM2-135M-Instruct: fp32 against packed W4 and W8 through qbayes.

Protocol: the first 64 tokens of wikitext-2 test as the prompt, 128 new tokens, greedy, with a
key/value cache (qbayes.generate); decode tokens/s = (new tokens - 1) / time after the first
token. Two decode loops over the same modules: ``hf``, the model's own Hugging Face forward with
its DynamicCache, and ``qbayes``, the lean decoder (qbayes.fastdecode: fused q/k/v and gate/up,
static cache, fused C++ norm/rotary/attention ops). fp32 and each quantized model (RTN, groups of
64, asymmetric, float16 scales; the solver does not change the speed) are run in interleaved
rounds in one process; reported: the median over rounds, and the speed-up over fp32 in the same
loop. ``onnxruntime``: the quantized models exported as decode-step graphs with a key/value cache
(``qbayes export --to onnx --kv-cache``: 4-bit layers as MatMulNBits, 8-bit as
DequantizeLinear + MatMul) and run greedily by ONNX Runtime's CPU provider with the same thread
count, in the same rounds; there is no float ONNX graph, so their "same loop" column compares
with fp32 in the qbayes loop. Embeddings and the tied lm_head stay in float, as quantize_ leaves them by default;
the last row packs lm_head too (quantize_(..., head=QuantSpec(8, 64, symmetric)), RTN).

    python bench/decode.py          # writes bench/results/decode.{json,md}
"""
from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, write_results  # noqa: E402

from qbayes import QuantSpec, quantize_  # noqa: E402
from qbayes.data import EVAL_TEXT, data_path, tokenize_file  # noqa: E402
from qbayes.export.onnx_decode import export_onnx_decoder, ort_generate  # noqa: E402
from qbayes.generate import generate  # noqa: E402
from qbayes.kernels import cpu as cpu_kernel  # noqa: E402
from qbayes.models import load_causal_lm, smollm2_135m  # noqa: E402

ENGINES = ("hf", "qbayes")


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
    speeds = {(k, e): [] for e in ENGINES for k in models}
    onnx_dir = Path(tempfile.mkdtemp(prefix="qbayes-decode-"))
    onnx_paths = {}
    for k, m in models.items():
        if k != "fp32":
            onnx_paths[k] = onnx_dir / f"{k.replace(' ', '_')}.onnx"
            export_onnx_decoder(m, onnx_paths[k], max_positions=prompt.shape[1] + 128)
            speeds[k, "onnxruntime"] = []
    texts = {}
    try:
        for _ in range(rounds):
            for (k, e) in speeds:
                if e == "onnxruntime":
                    r = ort_generate(onnx_paths[k], prompt, 128, threads=threads)
                    tps, text = r["tokens_per_s"], tok.decode(r["tokens"], skip_special_tokens=True)
                else:
                    g = generate(models[k], tok, prompt, 128, stop_at_eos=False, engine=e)
                    tps, text = g.tokens_per_s, g.text
                speeds[k, e].append(tps)
                texts[k, e] = text
                print(f"{k} [{e}]: {tps:.2f} tokens/s", flush=True)
    finally:
        shutil.rmtree(onnx_dir, ignore_errors=True)
    med = {key: statistics.median(v) for key, v in speeds.items()}
    # there is no float ONNX export: ONNX Runtime rows compare with fp32 in the qbayes loop
    rows = [{"model": k, "engine": e, "tokens_per_s": med[k, e], "runs": v,
             "speedup_vs_fp32": med[k, e] / med["fp32", e if e in ENGINES else "qbayes"],
             "speedup_vs_fp32_hf": med[k, e] / med["fp32", "hf"]}
            for (k, e), v in speeds.items()]
    res = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "threads": threads, "torch": torch.__version__,
           "packed_kernel": cpu_kernel.available(), "rows": rows,
           "first_words": {f"{k} [{e}]": t[:80] for (k, e), t in texts.items()},
           "same_text_both_loops": {k: texts[k, "hf"] == texts[k, "qbayes"] for k in models},
           "onnxruntime_same_text_as_qbayes": {k: texts[k, "onnxruntime"] == texts[k, "qbayes"] for k in onnx_paths},
           "onnxruntime": __import__("onnxruntime").__version__}
    lines = ["# Batch-1 decoding of SmolLM2-135M-Instruct (CPU)", "", __doc__.split("    python")[0].strip(), "",
             f"Machine: {res['machine']}; {threads} threads; torch {res['torch']}; packed kernel: {res['packed_kernel']}.", "",
             "| model | decode loop | tokens/s (median) | × fp32 (same loop) | × fp32 (hf loop) | runs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['engine']} | {r['tokens_per_s']:.2f} | {r['speedup_vs_fp32']:.2f} | "
                     f"{r['speedup_vs_fp32_hf']:.2f} | " + ", ".join(f"{v:.2f}" for v in r["runs"]) + " |")
    lines += ["", "Same greedy text from the hf and qbayes loops: "
              + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in res["same_text_both_loops"].items()) + "; "
              f"ONNX Runtime {res['onnxruntime']} against qbayes: "
              + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in res["onnxruntime_same_text_as_qbayes"].items())
              + "."]
    write_results("decode", res, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
