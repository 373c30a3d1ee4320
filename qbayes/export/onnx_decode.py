"""An ONNX decode-step graph with a key/value cache, for Llama-architecture models.

:func:`qbayes.export.export_onnx` writes the model's full forward (``input_ids -> logits``), which
a generation loop would have to rerun over the whole sequence at every token. The graph written
here takes the cache explicitly::

    input_ids (1, T), past_keys (layers, kv_heads, P, head_dim), past_values (same)
      -> logits (1, vocab) of the last position, present_keys / present_values (…, P + T, …)

so a runtime prefills with ``P = 0`` and then feeds one token and the present cache back per
step (:func:`ort_generate`). The computation is :class:`qbayes.fastdecode.LlamaDecoder`'s in
plain torch ops (grouped-query attention by repeating the key/value heads, rotary tables for
every position up to ``max_positions``); the linear layers are exported exactly as in
:func:`export_onnx` (MatMulNBits / DequantizeLinear over the packed bytes).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..errors import QBayesError

INPUTS = ["input_ids", "past_keys", "past_values"]
OUTPUTS = ["logits", "present_keys", "present_values"]


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class DecodeStep(nn.Module):
    """``(input_ids (1, T), past_keys, past_values) -> (logits (1, V), present_keys, present_values)``."""

    def __init__(self, model: nn.Module, max_positions: int | None = None):
        super().__init__()
        from ..fastdecode import _unsupported, activation, heads, rotary_tables

        why = _unsupported(model)
        if why is not None:
            raise QBayesError(f"the ONNX decode-step export supports Llama-architecture models only: {why}")
        cfg = model.config
        self.model = model
        inner = model.model
        self.H, self.KVH, self.D = heads(cfg)
        self.n_layers = len(inner.layers)
        self.act = activation(cfg)
        n = max_positions or getattr(cfg, "max_position_embeddings", 4096)
        cos, sin_signed = rotary_tables(inner, n, inner.embed_tokens.weight.dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin_signed", sin_signed, persistent=False)

    def forward(self, input_ids, past_keys, past_values):
        inner = self.model.model
        H, KVH, D = self.H, self.KVH, self.D
        T = input_ids.shape[1]
        P = past_keys.shape[2]
        x = inner.embed_tokens(input_ids[0])  # (T, C)
        cos = self.cos[P:P + T][:, None]
        sin = self.sin_signed[P:P + T][:, None]
        q_pos = torch.arange(T, device=x.device) + P
        allowed = torch.arange(P + T, device=x.device)[None, :] <= q_pos[:, None]  # (T, P + T)
        keys, values = [], []
        for i, layer in enumerate(inner.layers):
            a, mlp = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            h = _rms(x, ln1.weight, ln1.variance_epsilon)
            q = a.q_proj(h).view(T, H, D)
            k = a.k_proj(h).view(T, KVH, D)
            v = a.v_proj(h).view(T, KVH, D)
            q = q * cos + torch.cat([q[..., D // 2:], q[..., :D // 2]], -1) * sin
            k = k * cos + torch.cat([k[..., D // 2:], k[..., :D // 2]], -1) * sin
            k_all = torch.cat([past_keys[i], k.transpose(0, 1)], 1)  # (KVH, P + T, D)
            v_all = torch.cat([past_values[i], v.transpose(0, 1)], 1)
            keys.append(k_all)
            values.append(v_all)
            if KVH != H:
                k_all = k_all.repeat_interleave(H // KVH, 0)
                v_all = v_all.repeat_interleave(H // KVH, 0)
            s = torch.matmul(q.transpose(0, 1), k_all.transpose(1, 2)) * getattr(a, "scaling", D ** -0.5)
            s = s.masked_fill(~allowed, float("-inf"))
            o = torch.matmul(torch.softmax(s, -1), v_all)  # (H, T, D)
            x = x + a.o_proj(o.transpose(0, 1).reshape(T, H * D))
            h = _rms(x, ln2.weight, ln2.variance_epsilon)
            x = x + mlp.down_proj(self.act(mlp.gate_proj(h)) * mlp.up_proj(h))
        x = _rms(x[-1:], inner.norm.weight, inner.norm.variance_epsilon)
        return self.model.lm_head(x), torch.stack(keys), torch.stack(values)

    def empty_cache(self, dtype=torch.float32):
        return torch.zeros(self.n_layers, self.KVH, 0, self.D, dtype=dtype)


def export_onnx_decoder(model: nn.Module, path: str | Path, *, opset: int = 21,
                        max_positions: int | None = None) -> dict:
    """Write the decode-step graph of ``model`` (packed with qbayes) to ``path``; returns the
    layer report of :func:`qbayes.export.export_onnx`."""
    from .onnx import _translation, prepare_layers, restore_layers, save_program

    step = DecodeStep(model, max_positions).eval()
    report, prepared = prepare_layers(model)
    L, KVH, D = step.n_layers, step.KVH, step.D
    ids = torch.zeros(1, 3, dtype=torch.long)
    past = torch.zeros(L, KVH, 2, D)
    seq, ctx = torch.export.Dim("seq", min=1, max=8192), torch.export.Dim("past", min=0, max=8192)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            save_program(out, lambda: torch.onnx.export(
                step, (ids, past, past.clone()), dynamo=True, input_names=INPUTS, output_names=OUTPUTS,
                opset_version=opset, optimize=True,
                dynamic_shapes={"input_ids": {1: seq}, "past_keys": {2: ctx}, "past_values": {2: ctx}},
                custom_translation_table={torch.ops.qbayes.packed_linear.default: _translation()}))
    finally:
        restore_layers(prepared)
    report["graph"] = "decode step with key/value cache"
    return report


def _empty_cache(sess):
    """Zero-length past keys and values for a decode-step session (shapes from its inputs)."""
    import numpy as np

    L, kvh, _, d = sess.get_inputs()[1].shape  # [layers, kv_heads, past, head_dim]
    return np.zeros((L, kvh, 0, d), np.float32), np.zeros((L, kvh, 0, d), np.float32)


def ort_generate(path: str | Path, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                 threads: int | None = None) -> dict:
    """Greedy generation with ONNX Runtime over a decode-step graph: new token ids and decode tokens/s
    (new tokens after the first, per second after the first token, as :func:`qbayes.generate.generate`)."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    past_k, past_v = _empty_cache(sess)
    ids = prompt_ids.reshape(1, -1).numpy().astype(np.int64)
    new, t1 = [], time.perf_counter()
    logits, past_k, past_v = sess.run(None, {"input_ids": ids, "past_keys": past_k, "past_values": past_v})
    for i in range(max_new_tokens):
        nxt = int(logits[0].argmax())
        new.append(nxt)
        if i == 0:
            t1 = time.perf_counter()
        if i == max_new_tokens - 1:
            break
        logits, past_k, past_v = sess.run(None, {"input_ids": np.array([[nxt]], np.int64), "past_keys": past_k,
                                                 "past_values": past_v})
    dt = time.perf_counter() - t1
    return {"tokens": new, "tokens_per_s": (len(new) - 1) / dt if len(new) > 1 else float("nan")}


def check_decoder(path: str | Path, model: nn.Module, prompt_len: int = 6, steps: int = 3, seed: int = 0) -> float:
    """Largest relative difference between ONNX Runtime's logits (prefill of ``prompt_len``
    random tokens, then ``steps`` single-token steps through the cache) and ``model``'s own
    forward over the same prefixes."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len + steps),
                        generator=torch.Generator().manual_seed(seed))
    (k, v), worst = _empty_cache(sess), 0.0
    for end in range(prompt_len, prompt_len + steps + 1):
        start = 0 if end == prompt_len else end - 1
        lg, k, v = sess.run(None, {"input_ids": ids[:, start:end].numpy(), "past_keys": k, "past_values": v})
        with torch.no_grad():
            ref = model(input_ids=ids[:, :end], use_cache=False).logits[0, -1].double()
        got = torch.from_numpy(lg[0]).double()
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    return worst
