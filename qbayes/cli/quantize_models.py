"""``qbayes quantize --model cifar10-cnn|fmnist-mobilenet|fmnist-vit|minilm``: weights and activations of
the shipped image classifiers (top-1) and the MiniLM sentence encoder (embedding cosine to fp32).

Calibration and evaluation follow ``bench/act_ptq.py``: CIFAR-10 calibrates on the first 1,000 test
images and is scored on the other 9,000; the Fashion-MNIST models calibrate on 1,000 training images
and are scored on the test split; MiniLM calibrates on PTB-valid windows and is scored on WikiText-2
test lines. The transforms run in the order given, before quantizing (``biascorr`` after).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import QBayesError

VISION = ("cifar10-cnn", "fmnist-mobilenet", "fmnist-vit")
ENCODERS = ("minilm",)
#: which transforms apply to which kind of model (checked before anything runs)
TRANSFORMS = {"vision": ("bnfold", "cle", "absorb", "biascorr", "biascorr-analytic", "repq", "smoothquant",
                         "noisyquant"),
              "encoder": ("smoothquant",), "lm": ("smoothquant",)}


def parse_transforms(text: str | None, kind: str) -> list[str]:
    names = [t for t in (text or "").split(",") if t]
    bad = [t for t in names if t not in TRANSFORMS[kind]]
    if bad:
        raise QBayesError(f"--transforms {','.join(bad)} does not apply to this model: choose from "
                          f"{','.join(TRANSFORMS[kind])}")
    return names


def act_spec(args):
    """The ``ActSpec`` of ``--act-*`` (None for weight-only)."""
    if args.act_bits is None:
        return None
    from ..spec import ActSpec

    dynamic = args.act_granularity == "per-token" or args.act_dynamic
    return ActSpec(args.act_bits, args.act_granularity, dynamic=dynamic,
                   observer="minmax" if dynamic else args.act_observer)


def attention_specs(args, aspec, default_on: bool = False):
    """``(matmuls, softmax)`` ActSpecs of ``--attn-bits`` / ``--softmax-format`` (None: not quantized)."""
    from ..spec import ActSpec

    bits = args.attn_bits if args.attn_bits is not None else (aspec.bits if default_on and aspec else None)
    if bits is None:
        if args.softmax_format != "int":
            raise QBayesError("--softmax-format quantizes the attention probabilities: give --attn-bits")
        return None, None
    if aspec is None:
        raise QBayesError("--attn-bits quantizes activations inside attention: give --act-bits too")
    matmuls = aspec if args.attn_bits is None else ActSpec(bits, observer=aspec.observer if not aspec.dynamic
                                                          else "minmax")
    softmax = None if args.softmax_format == "int" else ActSpec(bits, format=args.softmax_format)
    return matmuls, softmax


def quantize_vision(args, spec, out: Path) -> int:
    from .. import quantize_, quantize_activations_, save_quantized
    from ..models.vision import load_vision
    from ..algorithms import get_solver
    from ..transforms.pipeline import run_recipe

    transforms = parse_transforms(args.transforms, "vision")
    aspec = act_spec(args)
    if {"smoothquant", "noisyquant"} & set(transforms) and aspec is None:
        raise QBayesError("--transforms smoothquant/noisyquant act on activation quantizers: give --act-bits")
    matmuls, softmax = attention_specs(args, aspec, default_on=args.model == "fmnist-vit")
    if matmuls is not None and args.model != "fmnist-vit":
        raise QBayesError(f"--attn-bits: {args.model} has no attention")
    from ..data import classifier_splits
    from ..eval import top1 as _top1

    model = load_vision(args.model)
    calib, xe, ye = classifier_splits(args.model)
    fp = None if args.no_eval else _top1(model, xe, ye)
    t0 = time.perf_counter()

    def quantize():
        if aspec is not None:  # ranges first, so GPTQ's statistic is of the quantized inputs
            quantize_activations_(model, aspec, calib, exclude=("*embed*",), matmuls=matmuls, softmax=softmax,
                                  smoothquant="search" if "smoothquant" in transforms else None,
                                  smoothquant_w_bits=spec.bits, noisyquant="noisyquant" in transforms,
                                  batch_size=100)
        quantize_(model, spec, args.method, calib if get_solver(args.method).needs_hessian else None, convs=True,
                  exclude=("*embed*",), float_dtype="float32", batch_size=100)

    run_recipe(model, transforms, calib, quantize)
    seconds = time.perf_counter() - t0
    save_quantized(model, out, extra={"source_model": args.model, "transforms": transforms})
    return _report(args, "top-1", fp, None if args.no_eval else _top1(model, xe, ye), seconds, out)


def quantize_encoder(args, spec, out: Path) -> int:
    from .. import quantize_, quantize_activations_, save_quantized
    from ..data import CALIB_TEXT, EVAL_TEXT, data_path, encoder_windows, sentence_lines, tokenize_file
    from ..eval import cosine_to_reference, sentence_embeddings
    from ..models import load_encoder, minilm_l6

    transforms = parse_transforms(args.transforms, "encoder")
    aspec = act_spec(args)
    if transforms and aspec is None:
        raise QBayesError("--transforms smoothquant moves activation outliers into the weights: give --act-bits")
    matmuls, softmax = attention_specs(args, aspec)
    model, tok = load_encoder(str(minilm_l6()))
    sentences = sentence_lines(Path(args.eval_text) if args.eval_text else data_path(EVAL_TEXT), min_words=8)
    ref = None if args.no_eval else sentence_embeddings(model, tok, sentences, max_length=128, progress=True)
    cpath = Path(args.calib) if args.calib else data_path(CALIB_TEXT)
    calib = encoder_windows(tokenize_file(cpath, tok), tok, seqlen=128, n=max(args.calib_samples, 128), seed=0)
    t0 = time.perf_counter()
    if aspec is not None:
        quantize_activations_(model, aspec, calib, smoothquant="search" if transforms else None, matmuls=matmuls,
                              softmax=softmax, smoothquant_w_bits=spec.bits, batch_size=16)
    quantize_(model, spec, args.method, calib, batch_size=16, act_order=args.act_order) if args.method == "gptq" \
        else quantize_(model, spec, args.method, calib, batch_size=16)
    seconds = time.perf_counter() - t0
    save_quantized(model, out, tokenizer=tok, extra={"source_model": str(minilm_l6()), "transforms": transforms})
    value = None
    if ref is not None:
        value = float(cosine_to_reference(ref, sentence_embeddings(model, tok, sentences, max_length=128)).mean())
    return _report(args, "mean cosine to fp32", 1.0 if ref is not None else None, value, seconds, out)


def _report(args, metric: str, fp, value, seconds: float, out: Path) -> int:
    acts = "weights only" if args.act_bits is None else f"A{args.act_bits} {args.act_granularity}"
    matmuls, softmax = attention_specs(args, act_spec(args), default_on=args.model == "fmnist-vit")
    if matmuls is not None:
        acts += f", attention A{matmuls.bits}" + ("" if softmax is None else f" ({softmax.format} softmax)")
    print(f"\n| model | method | weights | activations | transforms | {metric} | float | quantize (s) |")
    print("|---|---|---|---|---|---|---|---|")
    show = (lambda v: "-" if v is None else f"{v:.4f}")
    groups = {-1: "per-channel", 0: "per-tensor"}.get(args.group_size, f"g{args.group_size}")
    print(f"| {args.model} | {args.method} | W{args.bits} {groups} | {acts} | {args.transforms or '-'} | "
          f"{show(value)} | {show(fp)} | {seconds:.1f} |")
    print(f"\nsaved to {out}")
    return 0
