"""Whole-model throughput of real W8A8 integer execution: images/s of the shipped CIFAR-10 CNN and
Fashion-MNIST ViT, sentences/s of all-MiniLM-L6-v2, fp32 against ``qbayes.to_int8_`` and ONNX Runtime.

Protocol:
* CNN / ViT: W8 per-channel symmetric RTN, A8 static per-tensor (min-max on the calibration images of
  ``bench/act_ptq.py``) on every conv/linear input (the ViT's patch embedding and attention matmuls stay
  float), then ``qbayes.to_int8_``; timed on a batch of 256 evaluation images. ORT row: the same
  quantized model exported by ``qbayes.export.export_qdq`` and run by ONNX Runtime (its default
  optimisations, which fuse QDQ pairs into integer kernels).
* MiniLM: batch 64 = the first 64 WikiText-2 test lines of the encoder protocol, padded to the longest
  (≤ 128 tokens). qbayes int8: W8 per-channel RTN with A8 dynamic per-token ranges (the accurate
  recipe of ``act_ptq``), ``to_int8_``. Both torch models (fp32 and int8) run the same attention,
  torch's fused ``scaled_dot_product_attention`` (``sdpa``, the faster one here; ``--attention eager``
  for HF's eager matmul-softmax-matmul). ONNX Runtime: the fp32 export (eager attention, exported
  before the switch) and ORT's own ``quantize_static`` QDQ model and ``quantize_dynamic`` model of
  ``bench/act_ptq_text.py``.
* Every contender timed in interleaved rounds (``qbayes.benchmarks.kernels_cpu.timeit``: warm-up, then
  loops of ≥ 30 ms), median of 7 rounds, 2 torch threads and 2 ONNX Runtime intra-op threads, one process.
  The process keeps freed memory in glibc's heap (``mallopt``; ``--allocator default`` does not), as
  ONNX Runtime's arena does for its own buffers: torch's fresh buffers above glibc's mmap threshold
  (here the 8192 × 1536 float32 FFN activations) otherwise cost page faults on every call, for the
  fp32 and int8 torch models alike.

    python bench/int8_models.py     # writes bench/results/int8_models.{json,md}
    python bench/int8_models.py --models minilm --out /tmp/r   # one model, results elsewhere
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import act_ptq  # noqa: E402
import act_ptq_text  # noqa: E402
import common  # noqa: E402
from common import machine, provenance, write_results  # noqa: E402

from qbayes import ActSpec, QuantSpec, quantize_, quantize_activations_, to_int8_  # noqa: E402
from qbayes.benchmarks.kernels_cpu import timeit  # noqa: E402
from qbayes.models.vision import load_vision  # noqa: E402

ROUNDS = 7
W8 = QuantSpec(8, -1, symmetric=True, clip="mse", scale_dtype="float32")
warnings.filterwarnings("ignore")


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def vision_rows(name: str) -> list[dict]:
    from qbayes.export import export_qdq

    calib, xe, _ = act_ptq.data(name)
    x = xe[:256].contiguous()
    fp = load_vision(name)
    q = copy.deepcopy(fp)
    quantize_activations_(q, ActSpec(8), calib, exclude=("*embed*",), batch_size=100, progress=False)
    quantize_(q, W8, "rtn", convs=True, exclude=("*embed*",), float_dtype="float32", progress=False)
    fake = copy.deepcopy(q)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "qdq.onnx"
        export_qdq(q, x[:2], path)
        sess = _session(path)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        report = to_int8_(q)
        with torch.no_grad():
            fns = {"fp32": lambda: fp(x), "qbayes fake-quant": lambda: fake(x), "qbayes int8": lambda: q(x),
                   "onnxruntime QDQ (qbayes export)": lambda: sess.run(None, feed)}
            ms = timeit(fns, ROUNDS)
            top_int8 = float((q(x).argmax(1) == fake(x).argmax(1)).float().mean())
    return [{"model": name, "contender": k, "batch": 256, "ms": v, "items_per_s": 256e3 / v,
             "x_fp32": ms["fp32"] / v, "converted_layers": len(report["converted"]) if "int8" in k else None,
             "top1_agreement_int8_vs_fake": top_int8 if k == "qbayes int8" else None} for k, v in ms.items()]


def _set_attention(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def minilm_rows(attention: str = "sdpa") -> list[dict]:
    base, tok, sentences, calib = act_ptq_text._load("minilm")
    base.eval()
    enc = tok(sentences[:64], padding=True, truncation=True, max_length=128, return_tensors="pt")
    q = copy.deepcopy(base)
    quantize_activations_(q, ActSpec(8, "per-token", dynamic=True), progress=False)
    quantize_(q, W8, "rtn", progress=False)
    report = to_int8_(q)
    with tempfile.TemporaryDirectory() as d:
        fp_path, dyn, qdq = Path(d) / "fp32.onnx", Path(d) / "dyn.onnx", Path(d) / "qdq.onnx"
        act_ptq_text.export_encoder(base, tok, fp_path)
        act_ptq_text.ort_quantize(fp_path, calib, dyn, qdq)
        for m in (base, q):  # after the export (eager): the torch models' own attention
            _set_attention(m, attention)
        sess = {k: _session(p) for k, p in (("fp32", fp_path), ("dyn", dyn), ("qdq", qdq))}
        feed = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
        args = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        with torch.no_grad():
            fns = {"fp32": lambda: base(**args), "qbayes int8 (W8A8 per-token)": lambda: q(**args),
                   "onnxruntime fp32": lambda: sess["fp32"].run(None, feed),
                   "onnxruntime quantize_static QDQ": lambda: sess["qdq"].run(None, feed),
                   "onnxruntime quantize_dynamic": lambda: sess["dyn"].run(None, feed)}
            ms = timeit(fns, ROUNDS)
    return [{"model": "all-MiniLM-L6-v2", "contender": k, "batch": 64, "tokens": int(enc["input_ids"].shape[1]),
             "ms": v, "items_per_s": 64e3 / v, "x_fp32": ms["fp32"] / v,
             "converted_layers": len(report["converted"]) if "qbayes" in k else None, "attention": attention
             if k in ("fp32", "qbayes int8 (W8A8 per-token)") else "onnx export (eager)"} for k, v in ms.items()]


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Whole-model W8A8 integer throughput", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, onnxruntime "
             f"{res['onnxruntime']}; MiniLM torch attention `{res.get('attention', 'eager')}`, allocator "
             f"`{res.get('allocator', 'default')}`. Commit {res['commit']}; command `{res['command']}`; {res['date']}.", "",
             " ".join(__doc__.split("Protocol:")[1].split("python bench")[0].split()), "", *table(res)]
    return "\n".join(lines) + "\n"


def table(res: dict) -> list[str]:
    lines = ["| model | contender | batch | ms | items/s | × fp32 torch |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['contender']} | {r['batch']} | {r['ms']:.1f} | {r['items_per_s']:.0f} | "
                     f"{r['x_fp32']:.2f} |")
    return lines


def _retain_freed_memory() -> None:
    """glibc: serve large buffers from the heap and never trim it (no fresh, page-faulting pages per call)."""
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)):
        raise RuntimeError("mallopt refused the allocator settings")


def main() -> None:
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["cifar10-cnn", "fmnist-vit", "minilm"],
                    choices=["cifar10-cnn", "fmnist-vit", "minilm"])
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"], help="the torch MiniLM models' attention")
    ap.add_argument("--allocator", default="retain", choices=["retain", "default"],
                    help="retain: freed memory stays in the heap (no page faults on reuse); default: glibc's")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = ap.parse_args()
    if args.allocator == "retain":
        _retain_freed_memory()
    if args.out is not None:
        common.RESULTS = args.out
    torch.set_num_threads(2)
    prov = provenance()
    rows = []
    for name in (m for m in args.models if m != "minilm"):
        rows += vision_rows(name)
        print(*table({"rows": rows[-4:]})[2:], sep="\n", flush=True)
    if "minilm" in args.models:
        rows += minilm_rows(args.attention)
    res = {**prov, "protocol": " ".join(__doc__.split("Protocol:")[1].split("python bench")[0].split()),
           "machine": machine(2), "onnxruntime": onnxruntime.__version__, "rounds": ROUNDS,
           "attention": args.attention, "allocator": args.allocator, "rows": rows}
    write_results("int8_models", res, markdown(res), provenance_of=prov)
    print(markdown(res))


if __name__ == "__main__":
    main()
