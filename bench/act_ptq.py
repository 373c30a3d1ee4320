"""Weight + activation post-training quantization of the shipped image classifiers (issue 14).

    python bench/act_ptq.py [--only cifar10-cnn|fmnist-mobilenet|fmnist-vit|minilm|smollm2]

The language-model rows (MiniLM, SmolLM2, ONNX Runtime's quantizers) and their protocol are in
``bench/act_ptq_text.py``.

Protocol (recorded in the JSON):

* CIFAR-10 CNN (the ported Keras model, raw 0-255 pixels): calibrate on the first 1,000 JPEG test
  images, evaluate top-1 on the other 9,000 (no training split is shipped).
* Fashion-MNIST MobileNetV2-style net and ViT (trained by ``bench/models/train_fmnist.py``):
  calibrate on 1,000 training images (a seeded random subset), evaluate on the 10,000 test images.
* Weights: symmetric integer codes, per tensor with min-max ranges (the DFQ setting) or per output
  channel with the MSE range search; RTN or GPTQ (GPTQ's statistic from the calibration images).
  Activations: the input of every conv/linear (embeddings excluded: the ViT's patch embedding
  stays float), and for the ViT the operands of both attention matmuls; static asymmetric
  per-tensor ranges from the row's observer, observed on the float model before the weights are
  solved, so that GPTQ's statistic is of the quantized inputs. Quantization is simulated
  (fake-quant) on the float path.
* ``repq``: RepQ-ViT's post-LayerNorm scale reparameterisation from the calibration ranges (exact).
* ``absorb``: high-bias absorption with the offsets measured on the calibration images (exact).
* ``biascorr``: empirical bias correction after quantizing, against the float model with the
  row's other (function-preserving) rewrites, on the calibration images. ``biascorr-analytic``:
  DFQ's data-free correction, ``−ε E[x]`` with ``E[x]`` in closed form from the batch norms
  (layers that read a BN, through ReLU/ReLU6).
* ``noisyquant``: NoisyQuant's fixed noisy bias on every layer input quantizer, amplitude searched
  per layer (0 to 2 steps, "none" included) on the calibration images, draw seeded (seed 0).
* Every row's float baseline is measured in the same run (``fp_value``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import act_ptq_text  # noqa: E402
from common import machine, provenance, write_results  # noqa: E402
from qbayes import ActSpec, QuantSpec, quantize_, quantize_activations_  # noqa: E402
from qbayes.algorithms import get_solver  # noqa: E402
from qbayes.data import classifier_splits  # noqa: E402
from qbayes.eval import top1  # noqa: E402
from qbayes.models.vision import load_vision  # noqa: E402
from qbayes.transforms.pipeline import run_recipe  # noqa: E402

# (model, method, transforms, w_bits, w_granularity, a_bits, a_granularity, activation observer, attention softmax format)
CONFIGS = [
    ("cifar10-cnn", "rtn", [], 8, "per-tensor", 8, "per-tensor", "minmax", None),
    ("cifar10-cnn", "rtn", ["biascorr"], 8, "per-tensor", 8, "per-tensor", "minmax", None),
    ("cifar10-cnn", "rtn", [], 8, "per-channel", 8, "per-tensor", "minmax", None),
    ("cifar10-cnn", "rtn", [], 4, "per-channel", 8, "per-tensor", "minmax", None),
    ("cifar10-cnn", "gptq", [], 4, "per-channel", 8, "per-tensor", "minmax", None),
    ("cifar10-cnn", "gptq", [], 4, "per-channel", 8, "per-tensor", "mse", None),
    ("cifar10-cnn", "adaround", [], 4, "per-channel", 8, "per-tensor", "mse", None),
    ("fmnist-mobilenet", "rtn", [], 8, "per-tensor", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "rtn", ["bnfold"], 8, "per-tensor", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "rtn", ["bnfold", "cle"], 8, "per-tensor", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "rtn", ["bnfold", "cle", "absorb", "biascorr"], 8, "per-tensor", 8, "per-tensor", "minmax",
     None),
    ("fmnist-mobilenet", "rtn", ["bnfold"], 6, "per-tensor", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "rtn", ["bnfold", "cle"], 6, "per-tensor", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "rtn", ["bnfold", "cle", "biascorr"], 6, "per-tensor", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "rtn", ["bnfold", "cle", "absorb", "biascorr"], 6, "per-tensor", 8, "per-tensor", "minmax",
     None),
    ("fmnist-mobilenet", "rtn", ["bnfold", "biascorr-analytic"], 6, "per-tensor", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "rtn", ["bnfold"], 4, "per-channel", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "rtn", ["bnfold", "biascorr-analytic"], 4, "per-channel", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "rtn", ["bnfold", "biascorr"], 4, "per-channel", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "gptq", ["bnfold"], 4, "per-channel", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "adaround", ["bnfold"], 4, "per-channel", 8, "per-tensor", "minmax", None),
    ("fmnist-mobilenet", "gptq", ["bnfold", "cle"], 4, "per-channel", 8, "per-tensor", "minmax", None),
    ("fmnist-vit", "rtn", [], 8, "per-channel", 8, "per-tensor", "minmax", "int"),
    ("fmnist-vit", "rtn", [], 6, "per-channel", 6, "per-tensor", "minmax", "int"),
    ("fmnist-vit", "rtn", ["noisyquant"], 6, "per-channel", 6, "per-tensor", "minmax", "int"),
    ("fmnist-vit", "gptq", [], 6, "per-channel", 6, "per-tensor", "mse", "int"),
    ("fmnist-vit", "rtn", [], 4, "per-channel", 4, "per-tensor", "minmax", "int"),
    ("fmnist-vit", "rtn", ["noisyquant"], 4, "per-channel", 4, "per-tensor", "minmax", "int"),
    ("fmnist-vit", "rtn", [], 4, "per-channel", 4, "per-tensor", "minmax", "logsqrt2"),
    ("fmnist-vit", "rtn", ["repq"], 4, "per-channel", 4, "per-tensor", "minmax", "int"),
    ("fmnist-vit", "rtn", ["repq"], 4, "per-channel", 4, "per-tensor", "minmax", "logsqrt2"),
]


def data(model: str):
    return classifier_splits(model)


def run_row(cfg, calib, xe, ye, fp: float) -> dict:
    name, method, transforms, wb, wg, ab, ag, observer, soft = cfg
    model = load_vision(name)
    t0 = time.perf_counter()
    spec = (QuantSpec(wb, 0, symmetric=True, clip="minmax", scale_dtype="float32") if wg == "per-tensor"
            else QuantSpec(wb, -1, symmetric=True, clip="mse", scale_dtype="float32"))
    aspec = ActSpec(ab, ag, observer=observer)
    matmuls = ActSpec(ab, "per-tensor", observer=observer) if soft else None
    softmax = ActSpec(ab, "per-tensor", format=soft) if soft and soft != "int" else None

    def quantize():  # activation ranges first (on the float weights), so GPTQ's statistic is of quantized inputs
        quantize_activations_(model, aspec, calib, exclude=("*embed*",), matmuls=matmuls, softmax=softmax,
                              noisyquant="noisyquant" in transforms, batch_size=100, progress=False)
        quantize_(model, spec, method, calib if get_solver(method).needs_hessian else None, convs=True,
                  exclude=("*embed*",), float_dtype="float32", batch_size=100, progress=False)

    run_recipe(model, transforms, calib, quantize, progress=False)  # bias corrections after quantizing
    elapsed = time.perf_counter() - t0
    value = top1(model, xe, ye)
    row = {"model": name, "method": method, "transforms": transforms, "w_bits": wb, "w_granularity": wg,
           "a_bits": ab, "a_granularity": ag, "a_observer": observer, "softmax_format": soft, "metric": "top1",
           "value": value, "fp_value": fp, "quantize_s": elapsed}
    print(f"{name:17s} {method:4s} {'+'.join(transforms) or '-':10s} W{wb} {wg:11s} A{ab} {observer:6s} "
          f"softmax {soft or '-':8s} top-1 {value:.4f} (float {fp:.4f}) {elapsed:.1f} s", flush=True)
    return row


def markdown(res: dict) -> str:
    lines = ["# Weight + activation PTQ of image classifiers", "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['threads']} torch threads, torch "
             f"{res['machine']['torch']}. Commit {res['commit']}; command `{res['command']}`; {res['date']}.", "",
             res["protocol"]["summary"], "", res["protocol"].get("language_models", ""), "", *table(res)]
    return "\n".join(lines) + "\n"


def table(res: dict) -> list[str]:
    """The Markdown table of the rows (the README renders it from the JSON too)."""
    lines = ["| model | method | transforms | weights | activations | softmax | metric | value | float | change | "
             "time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        value, fp, change = act_ptq_text.value_cells(r)
        obs = "" if r["a_granularity"].endswith(r["a_observer"]) else " " + r["a_observer"]
        lines.append(f"| {r['model']} | {r['method']} | {'+'.join(r['transforms']) or '-'} | W{r['w_bits']} "
                     f"{r['w_granularity']} | A{r['a_bits']} {r['a_granularity']}{obs} | "
                     f"{r['softmax_format'] or '-'} | {r['metric']} | {value} | {fp} | {change} | {r['quantize_s']:.1f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run the rows of one model (printed, not saved)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    prov = provenance()
    rows, fps = [], {}
    for cfg in CONFIGS:
        if a.only and cfg[0] != a.only:
            continue
        calib, xe, ye = data(cfg[0])
        if cfg[0] not in fps:
            fps[cfg[0]] = top1(load_vision(cfg[0]), xe, ye)
            print(f"{cfg[0]}: float top-1 {fps[cfg[0]]:.4f}", flush=True)
        rows.append(run_row(cfg, calib, xe, ye, fps[cfg[0]]))
    if not a.only or a.only in act_ptq_text.MODELS:
        rows += act_ptq_text.run(a.only, log=lambda m: print(m, flush=True))
    if a.only:
        return
    text_protocol = act_ptq_text.__doc__.split("Protocol (recorded in the JSON):")[1]
    res = {**prov, "protocol": {"summary": " ".join(__doc__.split("Protocol (recorded in the JSON):")[1].split()),
                                "language_models": " ".join(text_protocol.split()),
                                "threads": 2, "simulation": "fake-quant on the float path"},
           "machine": machine(2), "rows": rows}
    write_results("act_ptq", res, markdown(res), provenance_of=prov)
    print(markdown(res))


if __name__ == "__main__":
    main()
