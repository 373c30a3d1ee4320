"""``qbayes export --to onnx`` of a checkpoint with activation quantizers: a QDQ ONNX model
(:func:`qbayes.export.export_qdq`) that ONNX Runtime runs, checked against qbayes on held-out inputs.

The shipped classifiers (``qbayes quantize --model cifar10-cnn|fmnist-mobilenet|fmnist-vit``) are
plain modules: their float skeleton is rebuilt from the shipped weights with the checkpoint's
recorded rewrites (``bnfold``, ``cle``, …, on the model's calibration images, as ``qbayes
quantize`` ran them) before the checkpoint's tensors are loaded into it. Transformers models
(MiniLM, a decoder LM) are rebuilt from their recorded config.

The check compares what a user of the export sees: top-1 agreement with qbayes on 256 evaluation
images, or the cosine between the two runs' (mean-pooled) sentence embeddings on 32 evaluation
sentences, beside
the largest relative difference of the raw outputs. Codes agree rule for rule, but a value within
float rounding of a rounding tie can round the other way in ONNX Runtime, and later layers carry
that step on (see :func:`qbayes.export.check_qdq`), so the raw difference is reported, not
required to vanish.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import QBayesError
from ..kernels.int8 import cpu_has_vnni

_VNNI_HINT = ("; this CPU has no VNNI, where ONNX Runtime's fused int8 kernels saturate u8*s8 products (an "
              "ONNX Runtime limitation: check on a VNNI CPU, or run the model with graph optimizations disabled)")
#: the least agreement ``--check`` accepts: a guard against a broken export (a wrong scale or layout
#: scores far below), not a bound on tie flips (MiniLM W8A8 with its attention matmuls quantized
#: measured a 0.9974 mean / 0.9901 minimum sentence cosine between the two runs)
MIN_TOP1_AGREEMENT, MIN_COSINE = 0.99, 0.98


def load_activation_checkpoint(path: Path, meta: dict):
    """``(model, example inputs, check inputs, labels or None)`` for an activation-quantized checkpoint."""
    from ..io import load_quantized

    if meta.get("model_config") is None:
        from ..data import classifier_splits
        from ..models.vision import ARCHITECTURES, load_vision
        from ..transforms.pipeline import apply_rewrites

        source = meta.get("source_model")
        if source not in ARCHITECTURES:
            raise QBayesError(f"{path} holds a {meta.get('model_class')} that is not one of qbayes's shipped "
                              f"classifiers ({', '.join(sorted(ARCHITECTURES))}): export it from Python with "
                              "qbayes.export.export_qdq(model, example_inputs, path)")
        skeleton = load_vision(source)
        calib, xe, _ = classifier_splits(source)
        apply_rewrites(skeleton, meta.get("transforms", []), calib)
        model, _ = load_quantized(path, model=skeleton)
        return model, calib[:2], xe[:256], None
    model, tok = load_quantized(path)
    if tok is None:
        raise QBayesError(f"{path} has no tokenizer: export it from Python with qbayes.export.export_qdq")
    from ..data import EVAL_TEXT, data_path, sentence_lines

    sentences = sentence_lines(data_path(EVAL_TEXT), min_words=8)[:32]
    batch = dict(tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    if getattr(model.config, "is_decoder", False) or hasattr(model, "lm_head"):
        batch = {"input_ids": batch["input_ids"]}
    return model, {k: v[:2] for k, v in batch.items()}, batch, batch.get("attention_mask")


def export_activation_checkpoint(args, meta: dict, out: Path) -> int:
    from ..export import export_qdq
    from ..export.onnx_qdq import check_qdq, ort_session

    if args.kv_cache:
        raise QBayesError("--kv-cache exports weight-only decoder LMs; this checkpoint quantizes activations")
    model, example, inputs, mask = load_activation_checkpoint(Path(args.path), meta)
    axes = None if isinstance(example, torch.Tensor) else {k: {0: "batch", 1: "seq"} for k in example}
    report = export_qdq(model, example, out, dynamic_axes=axes)
    floats = {**report["activations"]["float"], **report["weights"]["float"]}
    print(f"wrote {out} ({report['bytes'] / 1e6:.1f} MB): {len(report['activations']['qdq'])} activation quantizers "
          f"as QuantizeLinear/DequantizeLinear, {len(report['weights']['int8'])} int8 and "
          f"{len(report['weights'].get('int4', []))} int4 weight layers, {len(floats)} points as float ops")
    for name, why in sorted(floats.items())[:5]:
        print(f"  float: {name} ({why})")
    if not args.check:
        return 0
    rel = check_qdq(out, model, inputs)
    sess = ort_session(out)
    feeds = inputs if isinstance(inputs, dict) else {"input": inputs}
    got = torch.from_numpy(sess.run(None, {f.name: feeds[f.name].numpy() for f in sess.get_inputs()})[0])
    with torch.no_grad():
        ref = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    ref = ref if isinstance(ref, torch.Tensor) else (ref.logits if hasattr(ref, "logits") else ref.last_hidden_state)
    if isinstance(inputs, torch.Tensor):
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"check: ONNX Runtime vs qbayes on {len(inputs)} evaluation images: top-1 agreement {agree:.2%}, "
              f"max relative difference {rel:.2e}")
        if agree < MIN_TOP1_AGREEMENT:
            raise QBayesError(f"the exported model disagrees with qbayes on {1 - agree:.1%} of the images"
                              f"{_VNNI_HINT if not cpu_has_vnni() else ''}")
        return 0
    if mask is not None:  # a sentence encoder: what its user compares is the mean-pooled sentence embedding
        from ..eval.embedding import mean_pool

        got, ref = mean_pool(got, mask), mean_pool(ref, mask)
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(0, -2), ref.double().flatten(0, -2), dim=-1)
    what = "sentence-embedding" if mask is not None else "output"
    print(f"check: ONNX Runtime vs qbayes on {len(feeds['input_ids'])} evaluation sentences: {what} cosine "
          f"mean {float(cos.mean()):.6f}, min {float(cos.min()):.6f}; max relative difference {rel:.2e}")
    if float(cos.min()) < MIN_COSINE:
        raise QBayesError(f"the exported model disagrees with qbayes ({what} cosine {float(cos.min()):.4f} < {MIN_COSINE})"
                          f"{_VNNI_HINT if not cpu_has_vnni() else ''}")
    return 0
