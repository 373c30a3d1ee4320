"""Greedy or sampled token generation with a (quantized) causal LM, timed.

Decoding runs one token at a time with the key/value cache, so every linear sees one row of
activations: the regime where packed low-bit weights (fewer bytes to read) pay off.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .errors import QBayesError


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    engine: str = "hf"

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: new tokens after the first, per second of decoding."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")


def _cache_kwarg(model) -> str:
    """The KV-cache argument of a transformers model: ``cache`` from transformers 5.24 on (which
    deprecates ``past_key_values``, to be removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def generate(model: nn.Module, tok, prompt: str | torch.Tensor, max_new_tokens: int = 128, *,
             temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True,
             engine: str = "auto") -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt`` (text, or token ids ``(1, n)``).

    ``temperature=0`` is greedy; otherwise tokens are sampled from ``softmax(logits / T)`` with a
    generator seeded by ``seed``. The prefill (prompt) and the decode steps are timed apart.
    ``engine``: ``"qbayes"`` runs :class:`qbayes.fastdecode.LlamaDecoder` (Llama-architecture
    models), ``"hf"`` the model's own forward with a Hugging Face cache, ``"auto"`` the first
    where the model allows it.
    """
    if max_new_tokens < 1:
        raise QBayesError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise QBayesError(f"temperature must be >= 0, got {temperature}")
    if engine not in ("auto", "qbayes", "hf"):
        raise QBayesError(f"engine must be 'auto', 'qbayes' or 'hf', not {engine!r}")
    ids = tok(prompt, return_tensors="pt").input_ids if isinstance(prompt, str) else prompt
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise QBayesError("the prompt must be non-empty text or token ids of shape (1, n)")
    device = next(model.parameters(), torch.empty(0)).device
    ids = ids.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eos = getattr(tok, "eos_token_id", None) if stop_at_eos else None
    from .fastdecode import LlamaDecoder

    if engine == "qbayes" or (engine == "auto" and LlamaDecoder.supports(model)):
        dec = LlamaDecoder(model, ids.shape[1] + max_new_tokens)  # raises for an unsupported model
        t0 = time.perf_counter()
        logits = dec.prefill(ids[0])
        prefill = time.perf_counter() - t0

        def step(tok_id):
            return dec.step(tok_id)
        name = "qbayes"
    else:
        from transformers import DynamicCache

        kw = _cache_kwarg(model)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **{kw: DynamicCache()})
        prefill = time.perf_counter() - t0
        logits = out.logits[0, -1]
        state = {"cache": _cache_of(out)}

        def step(tok_id):
            o = model(input_ids=torch.tensor([[tok_id]], device=device), use_cache=True, **{kw: state["cache"]})
            state["cache"] = _cache_of(o)
            return o.logits[0, -1]
        name = "hf"

    new: list[int] = []
    t1 = time.perf_counter()
    for i in range(max_new_tokens):
        if temperature == 0:
            nxt = int(logits.argmax(-1))
        else:
            probs = torch.softmax(logits.float().cpu() / temperature, -1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        new.append(nxt)
        if i == 0:
            t1 = time.perf_counter()  # decode time counts the steps after the first token
        if (eos is not None and nxt == eos) or i == max_new_tokens - 1:
            break
        logits = step(nxt)
    decode = time.perf_counter() - t1
    return Generation(text=tok.decode(new, skip_special_tokens=True), prompt_tokens=ids.shape[1],
                      new_tokens=len(new), prefill_s=prefill, decode_s=decode, engine=name)
