"""``qbayes quantize``: calibrate, quantize, evaluate before and after, save."""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import QBayesError
from .common import _model_name, _resolve_model, _table, _windows
from .mixed import allocate_for
from .quantize_models import ENCODERS, VISION, act_spec, attention_specs, parse_transforms


def _quantize_shipped(args) -> int:
    """The shipped classifiers and the MiniLM encoder (:mod:`qbayes.cli.quantize_models`)."""
    from .. import QuantSpec
    from ..io import FORMAT, META, check_out_dir, own_files
    from .quantize_models import quantize_encoder, quantize_vision

    args.model = args.model.lower()
    if args.avg_bits is not None or args.head_bits is not None or args.float_targets:
        raise QBayesError("--avg-bits/--head-bits/--float-targets apply to causal LMs, not to " + args.model)
    vision = args.model in VISION
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric if not vision else True,
                     clip=args.clip, format=args.format, scale_dtype="float32" if vision else "float16")
    acts = "" if args.act_bits is None else f"a{args.act_bits}"
    out = Path(args.out) if args.out else Path("qbayes-out") / (
        f"{args.model}-w{args.bits}{acts}{'pc' if args.group_size == -1 else f'g{args.group_size}'}-{args.method}")
    check_out_dir(out, force=args.force, meta_name=META, fmt=FORMAT, own_files=own_files(out))
    return (quantize_vision if vision else quantize_encoder)(args, spec, out)


def _quantize(args) -> int:
    if args.float_targets and args.method != "gptq":
        raise QBayesError("--float-targets is a GPTQ option: use it with --method gptq")
    if args.act_bits is None and (args.act_granularity != "per-tensor" or args.act_dynamic):
        raise QBayesError("--act-granularity/--act-dynamic describe activation codes: give --act-bits too")
    shipped = args.model.lower() in VISION + ENCODERS
    if args.group_size is None:  # LMs: groups of 64; convolutions' inputs (e.g. 27 = 3x3x3) take one scale per row
        args.group_size = -1 if shipped else 64
    if shipped:
        return _quantize_shipped(args)

    from .. import QuantSpec, quantize_, save_quantized
    from ..data import CALIB_TEXT, calibration_windows, data_path, readable_text, tokenize_file
    from ..eval import perplexity
    from ..io import checkpoint_bytes
    from ..models import load_causal_lm

    from ..io import FORMAT, META, check_free_space, check_out_dir, own_files

    spec = QuantSpec(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, clip=args.clip,
                     format=args.format)
    tag = f"mix{args.avg_bits:g}" if args.avg_bits is not None else (args.format if args.format != "int" else f"w{args.bits}")
    name = _model_name(args.model)
    out = Path(args.out) if args.out else Path("qbayes-out") / (
        f"{name}-{tag}{'pc' if args.group_size == -1 else f'g{args.group_size}'}-{args.method}")
    sources = [args.model] if Path(args.model).exists() else []
    check_out_dir(out, sources=sources, force=args.force, meta_name=META, fmt=FORMAT, own_files=own_files(out))
    for text in (args.calib, args.eval_text):
        if text:
            readable_text(text)
    transforms = parse_transforms(args.transforms, "lm")
    aspec = act_spec(args)
    if transforms and aspec is None:
        raise QBayesError("--transforms smoothquant moves activation outliers into the weights: give --act-bits")
    matmuls, softmax = attention_specs(args, aspec)
    model_path = _resolve_model(args.model)
    model, tok = load_causal_lm(model_path)
    check_free_space(out, 2 * sum(p.numel() for p in model.parameters()))  # fp16 is an upper bound
    from ..api import select_layers
    select_layers(model, spec)  # refuse an impossible spec before minutes of evaluation
    head = None
    if args.head_bits is not None:
        from ..api import _check_head
        head = QuantSpec(bits=args.head_bits, group_size=args.group_size, symmetric=True, clip=args.clip)
        _check_head(model, head)
    fp32_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6  # tied tensors once
    rows = []
    windows = None if args.no_eval else _windows(args, tok)
    if windows is not None:
        print(f"evaluating fp32 perplexity on {len(windows)} windows of {args.seqlen} tokens")
        rows.append(("fp32", "-", "-", perplexity(model, windows), fp32_mb, None))

    from ..algorithms import get_solver
    solver = get_solver(args.method)
    calib = None
    if solver.needs_hessian or (aspec is not None and not aspec.dynamic) or transforms:
        cpath = Path(args.calib) if args.calib else data_path(CALIB_TEXT)
        calib = calibration_windows(tokenize_file(cpath, tok), args.seqlen, args.calib_samples)
    options = {"act_order": args.act_order, "damp": args.damp} if args.method == "gptq" else {}
    if args.float_targets:
        options["float_targets"] = True
    target, record = spec, None
    if args.avg_bits is not None:
        target, record = allocate_for(args, model, tok, spec)
    print(f"quantizing to {spec if record is None else f'mixed {args.avg_bits} bits'} with {args.method}"
          + (f" on {len(calib)} calibration windows" if calib is not None else ""))
    t0 = time.perf_counter()
    if aspec is not None:  # ranges (and SmoothQuant) on the float weights, so GPTQ sees quantized inputs
        from .. import quantize_activations_

        quantize_activations_(model, aspec, calib, smoothquant="search" if transforms else None, matmuls=matmuls,
                              softmax=softmax, smoothquant_w_bits=args.bits, batch_size=args.batch_size)
    quantize_(model, target, args.method, calib, batch_size=args.batch_size, head=head, **options)
    qs = time.perf_counter() - t0
    if record is not None:
        model.qbayes_config["allocation"] = record

    save_quantized(model, out, tokenizer=tok, extra={"source_model": str(model_path)})
    size_mb = checkpoint_bytes(out) / 1e6
    if windows is not None:
        print("evaluating quantized perplexity")
        ppl = perplexity(model, windows)
    else:
        ppl = float("nan")
    shown_bits = args.bits if record is None else f"{record['code_bits_per_weight']:.2f} (mixed)"
    method = args.method + ("" if aspec is None else f" A{aspec.bits} {aspec.granularity}") + (
        f" +{'+'.join(transforms)}" if transforms else "")
    rows.append((method, shown_bits, spec.granularity, ppl, size_mb, qs))
    print()
    print(_table(rows))
    print(f"\nsaved to {out}")
    return 0
