"""``qbayes eval`` (perplexity of a saved quantized model) and ``qbayes generate`` (text and
tokens per second)."""
from __future__ import annotations

from pathlib import Path

from ..errors import QBayesError
from .common import _resolve_model, _table, _windows


def _eval(args) -> int:
    from ..eval import perplexity
    from ..io import checkpoint_bytes, load_quantized

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
    from ..generate import generate
    from ..io import META, load_quantized

    p = Path(args.path)
    if (p / META).exists():
        model, tok = load_quantized(p)
    else:
        from ..models import load_causal_lm
        model, tok = load_causal_lm(_resolve_model(args.path))
    if tok is None:
        raise QBayesError(f"{args.path} holds no tokenizer: cannot tokenize the prompt")
    g = generate(model, tok, args.prompt, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                 engine=args.engine)
    print(args.prompt + g.text)
    print(f"\n{g.new_tokens} new tokens after a {g.prompt_tokens}-token prompt; prefill {g.prefill_s * 1e3:.0f} ms; "
          f"decode {g.tokens_per_s:.1f} tokens/s ({g.engine} decoder)")
    return 0
