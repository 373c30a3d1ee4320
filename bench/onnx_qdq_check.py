"""QDQ ONNX exports of W8A8 models run in ONNX Runtime, against qbayes's fake-quant forward (issue 14).

    python bench/onnx_qdq_check.py       # writes bench/results/onnx_qdq.{json,md}

Protocol (recorded in the JSON):

* Models and quantization (W8A8, static asymmetric per-tensor min-max activation ranges, RTN weights):
  the CIFAR-10 CNN (weights symmetric per tensor, as act_ptq's first row; every conv and dense input
  quantized) calibrated on the first 1,000 JPEG test images, scored on the other 9,000; the
  Fashion-MNIST ViT (weights symmetric per channel, MSE ranges; the inputs of every linear but the
  patch embedding and the four attention-matmul operands, softmax included, quantized) calibrated on
  1,000 training images (act_ptq's seeded subset), scored on the 10,000 test images; all-MiniLM-L6-v2
  (weights asymmetric per channel, MSE ranges, float16 scales; the 36 block linears packed, every
  linear input but the embeddings quantized) calibrated on encoder.py's 512 PTB-valid windows,
  scored on the first 512 WikiText-2 test lines of >= 8 words (padded batches of 32, at most 128 tokens).
* Export: qbayes.export.onnx_qdq.export_qdq (opset 21; dynamic batch, and sequence for MiniLM).
* ONNX Runtime (CPUExecutionProvider) in three modes: "none" (no graph optimization: the ONNX
  semantics), "faithful" (all optimizations except ORT's WeightBiasQuantization, MatMulNBits in
  float32), "default" (ORT's defaults, which quantize float weights/biases next to QDQ inputs).
* max_rel: max |ort - qbayes| / max |qbayes| over the scored set (MiniLM: last_hidden_state at unmasked
  positions); within_1e-3: share of samples whose largest difference is <= 1e-3 of that max.
* codes (on the first 200 images or MiniLM's first batch of 32 sentences, mode none): rule_mismatches counts codes where ORT's
  QuantizeLinear differs from qbayes's rule on the same input; flipped counts codes that differ
  between the two runs (near-ties pushed across by float summation order, then their consequences).
* qbayes_ulp: qbayes against itself with the input of every activation quantizer moved by one float32
  ulp (relative 2^-23, random signs, seed 0): how far float rounding alone moves the model's outputs.
* threads: 2.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, machine, provenance, write_results  # noqa: E402
from qbayes import ActSpec, QuantSpec, quantize_, quantize_activations_  # noqa: E402
from qbayes.export.onnx_qdq import ORT_MODES, compare_codes, export_qdq, ort_session  # noqa: E402

CODE_SAMPLES = 200


def vision(name: str):
    from qbayes.data import load_cifar10_test, load_image_dataset
    from qbayes.models.vision import load_vision

    if name == "cifar10-cnn":
        (xc, _), (xe, ye) = load_cifar10_test("calib"), load_cifar10_test("eval")
        wspec = QuantSpec(8, 0, symmetric=True, clip="minmax", scale_dtype="float32")
        matmuls = None
    else:
        x, _ = load_image_dataset("fashion-mnist", "train", normalize=None)
        xc = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1000]]
        xe, ye = load_image_dataset("fashion-mnist", "test", normalize=None)
        wspec = QuantSpec(8, -1, symmetric=True, clip="mse", scale_dtype="float32")
        matmuls = ActSpec(8)
    fp32 = load_vision(name)
    model = copy.deepcopy(fp32)
    t0 = time.perf_counter()
    quantize_activations_(model, ActSpec(8), xc, exclude=("*embed*",), matmuls=matmuls, batch_size=100,
                          progress=False)
    quantize_(model, wspec, "rtn", convs=True, exclude=("*embed*",), float_dtype="float32", progress=False)
    batches = [(b,) for b in xe.split(500)]
    return fp32, model, time.perf_counter() - t0, xc[:2], None, batches, ye


def minilm():
    from qbayes.data import CALIB_TEXT, EVAL_TEXT, data_path, encoder_windows, sentence_lines, tokenize_file
    from qbayes.models import load_encoder, minilm_l6

    fp32, tok = load_encoder(str(minilm_l6()))
    model = copy.deepcopy(fp32)
    calib = encoder_windows(tokenize_file(data_path(CALIB_TEXT), tok), tok, seqlen=128, n=512, seed=0)
    t0 = time.perf_counter()
    quantize_activations_(model, ActSpec(8), calib, batch_size=16, progress=False)
    quantize_(model, QuantSpec(8, -1, symmetric=False, clip="mse"), "rtn", progress=False)
    elapsed = time.perf_counter() - t0
    sentences = sentence_lines(data_path(EVAL_TEXT), min_words=8)[:512]
    batches = [dict(tok(sentences[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(sentences), 32)]
    example = {k: v[:2] for k, v in batches[0].items()}
    axes = {k: {0: "batch", 1: "seq"} for k in example}
    return fp32, model, elapsed, example, axes, batches, None


@torch.no_grad()
def outputs(model, batches, ulp: bool = False) -> list[torch.Tensor]:
    """The model's main output per batch (logits, or MiniLM's last hidden state); ``ulp``: with the
    input of every activation quantizer moved by one float32 ulp (what another implementation's
    float rounding does to it)."""
    from qbayes.nn.act_quant import ActQuant

    g = torch.Generator().manual_seed(0)
    hooks = [m.register_forward_pre_hook(
        lambda m, a: (a[0] * (1 + (torch.randint(0, 2, a[0].shape, generator=g) * 2 - 1) * 2.0 ** -23), *a[1:]))
        for m in model.modules() if ulp and isinstance(m, ActQuant)]
    try:
        res = []
        for b in batches:
            out = model(**b) if isinstance(b, dict) else model(*b)
            res.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out)
        return res
    finally:
        for h in hooks:
            h.remove()


def ort_outputs(path: Path, mode: str, batches) -> list[torch.Tensor]:
    sess = ort_session(path, mode)
    names = [i.name for i in sess.get_inputs()]
    res = []
    for b in batches:
        feeds = {n: t.numpy() for n, t in zip(names, b.values() if isinstance(b, dict) else b)}
        res.append(torch.from_numpy(sess.run(None, feeds)[0]))
    return res


def compare(got: list[torch.Tensor], ref: list[torch.Tensor], masks) -> dict:
    """max_rel over the set and the share of samples within 1e-3 of the set's largest |output|."""
    if masks is not None:  # per-sentence rows at the unmasked positions
        got = [g * m.unsqueeze(-1) for g, m in zip(got, masks)]
        ref = [r * m.unsqueeze(-1) for r, m in zip(ref, masks)]
    scale = max(float(r.abs().max()) for r in ref)
    per = torch.cat([(g - r).abs().flatten(1).amax(1) for g, r in zip(got, ref)]) / scale
    return {"max_rel": float(per.max()), "within_1e-3": float((per <= 1e-3).float().mean())}


def score(out: list[torch.Tensor], labels, masks, ref_scores=None) -> dict:
    """top-1 (vision) or unit-norm mean-pooled embeddings (MiniLM) of a run's outputs."""
    if labels is not None:
        pred = torch.cat([o.argmax(-1) for o in out])
        return {"pred": pred, "top1": float((pred == labels).float().mean())}
    from qbayes.eval.embedding import mean_pool

    emb = torch.cat([torch.nn.functional.normalize(mean_pool(o, m), dim=-1) for o, m in zip(out, masks)])
    return {"emb": emb}


def agreement(a: dict, b: dict) -> dict:
    if "pred" in a:
        return {"top1_agreement": float((a["pred"] == b["pred"]).float().mean())}
    cos = (a["emb"].double() * b["emb"].double()).sum(-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def fused_ops(path: Path) -> dict:
    """What ONNX Runtime's default optimizations (at the portable EXTENDED level) turn the graph into."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(path.with_suffix(".ort.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    keep = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "MatMulNBits", "Conv", "FusedConv",
            "MatMul", "Gemm", "FusedGemm", "QuantizeLinear", "DequantizeLinear")
    return {k: ops.count(k) for k in keep if ops.count(k)}


def run_model(name: str, workdir: Path) -> dict:
    fp32, model, quantize_s, example, axes, batches, labels = minilm() if name == "minilm" else vision(name)
    masks = None if labels is not None else [b["attention_mask"] for b in batches]
    path = workdir / f"{name}.onnx"
    t0 = time.perf_counter()
    report = export_qdq(model, example, path, dynamic_axes=axes)
    export_s = time.perf_counter() - t0
    ref = outputs(model, batches)
    ref_s = score(ref, labels, masks)
    row = {"model": name, "quantize_s": quantize_s, "export_s": export_s, "onnx_bytes": path.stat().st_size,
           "fp32_param_bytes": sum(p.numel() * 4 for p in fp32.parameters()),
           "qdq_activations": len(report["activations"]["qdq"]), "float_activations": report["activations"]["float"],
           "int8_weight_layers": len(report["weights"]["int8"]), "float_weight_layers": report["float_layers"],
           "graph_ops": {k: report["ops"][k] for k in ("QuantizeLinear", "DequantizeLinear") if k in report["ops"]},
           "ort_fused_ops": fused_ops(path), "modes": {}}
    if labels is not None:
        row["top1_qbayes"], row["top1_fp32"] = ref_s["top1"], score(outputs(fp32, batches), labels, None)["top1"]
    else:
        fp_s = score(outputs(fp32, batches), None, masks)
        row["cosine_qbayes_vs_fp32"] = agreement(ref_s, fp_s)["cosine_mean"]
    for mode in ORT_MODES:
        got = ort_outputs(path, mode, batches)
        got_s = score(got, labels, masks)
        entry = {**compare(got, ref, masks), **agreement(got_s, ref_s)}
        entry["top1" if labels is not None else "cosine_vs_fp32"] = (
            got_s["top1"] if labels is not None else agreement(got_s, fp_s)["cosine_mean"])
        row["modes"][mode] = entry
    ulp = outputs(model, batches, ulp=True)
    row["qbayes_ulp"] = {**compare(ulp, ref, masks), **agreement(score(ulp, labels, masks), ref_s)}
    sub = _first(batches, CODE_SAMPLES)
    codes = compare_codes(path, model, sub)
    first_flip = next((n for n, c in codes.items() if c["flipped"]), None)
    row["codes"] = {"quantizers": len(codes), "codes": sum(c["codes"] for c in codes.values()),
                    "rule_mismatches": sum(c["rule_mismatches"] for c in codes.values()),
                    "flipped": sum(c["flipped"] for c in codes.values()), "first_flip_at": first_flip,
                    "first_flip_input_drift": codes[first_flip]["input_drift"] if first_flip else None,
                    "samples": len(next(iter(sub.values()))) if isinstance(sub, dict) else len(sub)}
    print(f"{name}: {row['modes']} ulp {row['qbayes_ulp']} codes {row['codes']}", flush=True)
    return row


def _first(batches, n: int):
    """The first ``n`` images, or MiniLM's first padded batch (32 sentences)."""
    if isinstance(batches[0], dict):
        return batches[0]
    return torch.cat([x[0] for x in batches])[:n]


def markdown(res: dict) -> str:
    lines = ["# QDQ ONNX export: ONNX Runtime vs qbayes (W8A8, static per-tensor activations)", "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['threads']} torch threads, torch "
             f"{res['machine']['torch']}, onnxruntime {res['onnxruntime']}. Commit {res['commit']}; command "
             f"`{res['command']}`; {res['date']}.", "", res["protocol"], "",
             "| model | ORT mode | max rel | samples within 1e-3 | top-1 / cosine vs qbayes | ORT top-1 / cosine vs fp32 |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for mode, e in [*r["modes"].items(), ("qbayes + 1 ulp", r["qbayes_ulp"])]:
            agree = (f"{100 * e['top1_agreement']:.2f}%" if "top1_agreement" in e else
                     f"{e['cosine_mean']:.6f} (min {e['cosine_min']:.4f})")
            own = (f"{100 * e['top1']:.2f}%" if "top1" in e else f"{e['cosine_vs_fp32']:.4f}" if "cosine_vs_fp32" in e
                   else "-")
            lines.append(f"| {r['model']} | {mode} | {e['max_rel']:.2e} | {100 * e['within_1e-3']:.1f}% | {agree} | {own} |")
    lines += ["", "| model | qbayes top-1 / cosine vs fp32 | fp32 top-1 | ONNX MB | fp32 params MB | QDQ activations "
              "| int8 weight layers | codes compared | rule mismatches | flipped | first flip | ORT fused ops (default) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        q = f"{100 * r['top1_qbayes']:.2f}%" if "top1_qbayes" in r else f"{r['cosine_qbayes_vs_fp32']:.4f}"
        fp = f"{100 * r['top1_fp32']:.2f}%" if "top1_fp32" in r else "-"
        c = r["codes"]
        ops = ", ".join(f"{k} {v}" for k, v in r["ort_fused_ops"].items())
        lines.append(f"| {r['model']} | {q} | {fp} | {r['onnx_bytes'] / 1e6:.2f} | {r['fp32_param_bytes'] / 1e6:.2f} | "
                     f"{r['qdq_activations']} | {r['int8_weight_layers']} | {c['codes']:,} | {c['rule_mismatches']} | "
                     f"{c['flipped']:,} | {c['first_flip_at'] or '-'} | {ops} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import tempfile

    import onnxruntime

    torch.set_num_threads(2)
    prov = provenance()
    with tempfile.TemporaryDirectory() as d:
        rows = [run_model(name, Path(d)) for name in ("cifar10-cnn", "fmnist-vit", "minilm")]
    res = {**prov, "protocol": " ".join(__doc__.split("Protocol (recorded in the JSON):")[1].split()),
           "machine": machine(2), "onnxruntime": onnxruntime.__version__, "rows": rows}
    write_results("onnx_qdq", res, markdown(res), provenance_of=prov)
    print(markdown(res))
    print(f"wrote {RESULTS / 'onnx_qdq.json'}")


if __name__ == "__main__":
    main()
