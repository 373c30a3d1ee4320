"""``qbayes export``: a saved quantized model to ONNX (checked in ONNX Runtime) or GGUF; a checkpoint
with activation quantizers becomes a QDQ model (:mod:`.export_qdq`)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import QBayesError


def _export(args) -> int:
    import torch

    from ..io import check_out_file, load_quantized, own_files, read_metadata

    default = "model.gguf" if args.to == "gguf" else "model_decode.onnx" if args.kv_cache else "model.onnx"
    out = Path(args.out) if args.out else Path(args.path) / default
    protected = [Path(args.path) / n for n in own_files(Path(args.path))]
    check_out_file(out, force=args.force, protected=protected)  # before minutes of export
    meta = read_metadata(args.path)
    if "activations" in meta and args.to == "onnx":
        from .export_qdq import export_activation_checkpoint

        return export_activation_checkpoint(args, meta, out)
    model, _ = load_quantized(args.path)
    if args.to == "gguf":
        return _export_gguf(args, model, out)
    from ..export import export_onnx

    if args.kv_cache:
        from ..export.onnx_decode import export_onnx_decoder

        report = export_onnx_decoder(model, out)
    else:
        report = export_onnx(model, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {report['MatMulNBits']} layers as MatMulNBits, "
          f"{report['DequantizeLinear']} as DequantizeLinear+MatMul, {len(report['float'])} converted to float")
    if args.check and args.kv_cache:
        from ..export.onnx_decode import check_decoder

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


def _export_gguf(args, model, out: Path) -> int:
    from ..export.gguf import export_gguf

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
