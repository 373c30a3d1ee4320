"""The language-model rows of ``bench/act_ptq.py``: all-MiniLM-L6-v2 (embedding cosine) and
SmolLM2-135M-Instruct (perplexity), weights and activations quantized, beside ONNX Runtime's own
int8 quantizers on the same encoder.

Protocol (recorded in the JSON):

* all-MiniLM-L6-v2: the protocol of ``bench/encoder.py`` (WikiText-2 test lines, mean-pooled
  embeddings, cosine to the fp32 model's; calibration: 512 PTB-valid windows of 128 tokens).
  Activations: the input of every linear (embeddings stay float); rows with a softmax format
  also quantize the four attention-matmul operands (queries, keys, softmax output, values; static
  per-tensor 8-bit min-max, at the points of ``qbayes.models.hf_attention``).
* ONNX Runtime rows: the fp32 encoder exported with ``torch.onnx.export(dynamo=True)``, then
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, dynamic uint8 activations, ORT's
  defaults) and ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, min-max
  calibration on the first 64 of the same calibration windows; only the MatMul/Gemm nodes with a
  weight, the points qbayes quantizes), run by ONNX Runtime on the CPU.
* SmolLM2-135M-Instruct: protocol v1 of ``bench/llm_ptq.py`` (40 windows of 512 WikiText-2 test
  tokens; calibration 64 PTB-valid windows of 512 tokens). Activations: the input of every linear
  but ``lm_head``.
* Weights: integer codes with MSE range search, RTN or GPTQ (act-order); activations asymmetric
  8-bit, static per-tensor (min-max observer) or dynamic per-token. ``smoothquant``: SmoothQuant
  with the per-layer α search against the row's weight bit-width, on the calibration data.
  Activation quantizers are placed (and static ones calibrated) on the float weights, before the
  weights are solved. Simulation: fake-quant on the float path.
"""
from __future__ import annotations

import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from qbayes import ActSpec, QuantSpec, quantize_, quantize_activations_
from qbayes.data import (CALIB_TEXT, EVAL_TEXT, calibration_windows, data_path, encoder_windows, eval_windows,
                         sentence_lines, tokenize_file)
from qbayes.eval import cosine_to_reference, perplexity, sentence_embeddings
from qbayes.models import load_causal_lm, load_encoder, minilm_l6, smollm2_135m

# (model, method, transforms, w_bits, w_group (-1 per channel), a_granularity[, attention softmax format])
CONFIGS = [
    ("minilm", "rtn", [], 8, -1, "per-tensor"),
    ("minilm", "rtn", ["smoothquant"], 8, -1, "per-tensor"),
    ("minilm", "rtn", ["smoothquant"], 8, -1, "per-tensor", "int"),
    ("minilm", "rtn", [], 8, -1, "per-token"),
    ("minilm", "rtn", [], 8, -1, "per-token", "int"),
    ("minilm", "gptq", [], 4, 32, "per-token"),
    ("minilm", "gptq", ["smoothquant"], 4, 32, "per-tensor"),
    ("smollm2", "rtn", [], 8, -1, "per-token"),
    ("smollm2", "rtn", [], 8, -1, "per-token", "int"),
    ("smollm2", "rtn", [], 8, -1, "per-tensor"),
    ("smollm2", "rtn", ["smoothquant"], 8, -1, "per-tensor"),
    ("smollm2", "rtn", ["smoothquant"], 8, -1, "per-token"),
    ("smollm2", "gptq", [], 4, 64, "per-token"),
]
MODELS = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _load(name: str):
    if name == "minilm":
        model, tok = load_encoder(str(minilm_l6()))
        model.config._attn_implementation = "eager"  # one attention path for torch and the ONNX export
        sentences = sentence_lines(data_path(EVAL_TEXT), min_words=8)
        calib = encoder_windows(tokenize_file(data_path(CALIB_TEXT), tok), tok, seqlen=128, n=512, seed=0)
        return model, tok, sentences, calib
    model, tok = load_causal_lm(str(smollm2_135m()))
    windows = eval_windows(tokenize_file(data_path(EVAL_TEXT), tok), 512, 40)
    calib = calibration_windows(tokenize_file(data_path(CALIB_TEXT), tok), 512, 64, seed=0)
    return model, tok, windows, calib


def _score(name, model, tok, evaluation, ref):
    if name == "minilm":
        emb = sentence_embeddings(model, tok, evaluation, max_length=128)
        return float(cosine_to_reference(ref, emb).mean())
    return perplexity(model, evaluation, progress=False)


def _row(name, method, transforms, wb, wg, ag, value, fp, seconds, a_observer="minmax", soft=None) -> dict:
    return {"model": MODELS[name], "method": method, "transforms": transforms, "w_bits": wb,
            "w_granularity": "per-channel" if wg == -1 else f"g{wg}", "a_bits": 8, "a_granularity": ag,
            "a_observer": a_observer if ag == "per-tensor" else "dynamic", "softmax_format": soft,
            "metric": "cosine" if name == "minilm" else "ppl", "value": value, "fp_value": fp, "quantize_s": seconds}


def run_config(cfg, base, tok, evaluation, calib, ref, fp) -> dict:
    name, method, transforms, wb, wg, ag, soft = (*cfg, None)[:7]
    model = copy.deepcopy(base)
    bs = 16 if name == "minilm" else 4
    t0 = time.perf_counter()
    aspec = ActSpec(8, ag, dynamic=ag == "per-token")
    matmuls = ActSpec(8) if soft else None  # attention operands: static per-tensor min-max
    quantize_activations_(model, aspec, calib, smoothquant="search" if "smoothquant" in transforms else None,
                          smoothquant_w_bits=wb, matmuls=matmuls, batch_size=bs, progress=False)
    opts = {"act_order": True} if method == "gptq" else {}
    quantize_(model, QuantSpec(bits=wb, group_size=wg, symmetric=False, clip="mse"), method, calib,
              batch_size=bs, progress=False, **opts)
    seconds = time.perf_counter() - t0
    return _row(name, method, transforms, wb, wg, ag, _score(name, model, tok, evaluation, ref), fp, seconds,
                soft=soft)


def _ort_embeddings(path: Path, tok, sentences, batch_size: int = 32) -> torch.Tensor:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=128, return_tensors="np")
        h = torch.from_numpy(sess.run(None, dict(zip(names, (enc["input_ids"], enc["attention_mask"]))))[0])
        m = torch.from_numpy(enc["attention_mask"]).float().unsqueeze(-1)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(out)


def export_encoder(base, tok, path: Path) -> None:
    """The fp32 encoder as ONNX (``input_ids``, ``attention_mask`` -> last hidden states), dynamic shapes."""
    enc = tok(["an example sentence for tracing", "two"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Encoder(base).eval(), (enc["input_ids"], enc["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), dynamo=True)


def ort_quantize(fp_path: Path, calib, dynamic_path: Path, qdq_path: Path) -> dict:
    """ONNX Runtime's ``quantize_dynamic`` and ``quantize_static`` (QDQ) of an exported encoder;
    returns their wall times."""
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs a warning per tensor it leaves alone
    graph = onnx.load(str(fp_path)).graph
    names = [i.name for i in graph.input]
    weights = {t.name for t in graph.initializer}
    linears = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            ids, mask = calib["input_ids"][:64].numpy(), calib["attention_mask"][:64].numpy()
            self.items = iter([dict(zip(names, (ids[i:i + 8], mask[i:i + 8]))) for i in range(0, 64, 8)])

        def get_next(self):
            return next(self.items, None)

    t0 = time.perf_counter()
    quantize_dynamic(str(fp_path), str(dynamic_path), weight_type=QuantType.QInt8)
    t_dyn = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the points qbayes quantizes: the inputs and weights of the linears (MatMul/Gemm with a weight
    # initializer); ORT's default also quantizes LayerNorm weights, additions and the attention matmuls
    quantize_static(str(fp_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=linears)
    return {"dynamic_s": t_dyn, "static_s": time.perf_counter() - t0}


def ort_rows(base, tok, sentences, calib, ref, fp) -> list[dict]:
    """ONNX Runtime's ``quantize_dynamic`` and ``quantize_static`` (QDQ) on the exported fp32 encoder."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        fp_path, dyn, qdq = Path(d) / "minilm_fp32.onnx", Path(d) / "dynamic.onnx", Path(d) / "qdq.onnx"
        export_encoder(base, tok, fp_path)
        fp_ort = float(cosine_to_reference(ref, _ort_embeddings(fp_path, tok, sentences)).mean())
        times = ort_quantize(fp_path, calib, dyn, qdq)
        for method, path, ag, t in (("ort-quantize_dynamic", dyn, "per-tensor", times["dynamic_s"]),
                                    ("ort-quantize_static-qdq", qdq, "per-tensor", times["static_s"])):
            value = float(cosine_to_reference(ref, _ort_embeddings(path, tok, sentences)).mean())
            r = _row("minilm", method, [], 8, -1 if method.endswith("qdq") else 0, "per-tensor", value, fp, t)
            r["w_granularity"] = "per-channel" if method.endswith("qdq") else "per-tensor"
            r["a_observer"] = "minmax" if method.endswith("qdq") else "dynamic"
            r["ort_fp32_cosine"] = fp_ort
            rows.append(r)
    return rows


def run(only: str | None = None, log=print) -> list[dict]:
    rows = []
    for name in ("minilm", "smollm2"):
        if only and only != name:
            continue
        base, tok, evaluation, calib = _load(name)
        base.eval()
        ref = sentence_embeddings(base, tok, evaluation, max_length=128) if name == "minilm" else None
        fp = 1.0 if name == "minilm" else perplexity(base, evaluation, progress=False)
        log(f"{MODELS[name]}: float {fp:.4f}")
        for cfg in CONFIGS:
            if cfg[0] == name:
                rows.append(run_config(cfg, base, tok, evaluation, calib, ref, fp))
                log(_describe(rows[-1]))
        if name == "minilm":
            for r in ort_rows(base, tok, evaluation, calib, ref, fp):
                rows.append(r)
                log(_describe(r))
    return rows


def _describe(r: dict) -> str:
    return (f"{r['model']:22s} {r['method']:24s} {'+'.join(r['transforms']) or '-':12s} W{r['w_bits']} "
            f"{r['w_granularity']:11s} A{r['a_bits']} {r['a_granularity']:18s} {r['metric']} {r['value']:.4f} "
            f"(float {r['fp_value']:.4f}) {r['quantize_s']:.1f} s")


def value_cells(r: dict) -> tuple[str, str, str]:
    """(value, float, change) table cells for a row of any metric."""
    v, f = r["value"], r["fp_value"]
    if r["metric"] == "top1":
        return f"{100 * v:.2f}", f"{100 * f:.2f}", f"{100 * (v - f):+.2f} pt"
    if r["metric"] == "cosine":
        return f"{v:.4f}", f"{f:.4f}", f"{v - f:+.4f}"
    return f"{v:.2f}", f"{f:.2f}", f"×{v / f:.3f}"


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    np.set_printoptions(precision=4)
    run(sys.argv[1] if len(sys.argv) > 1 else None)
