"""A lean batch-1 decoder for Llama-architecture causal LMs (Llama, SmolLM2, Mistral, Qwen2).

Hugging Face's eager forward spends more time in per-layer Python and small tensor ops than a
packed 4-bit model spends reading its weights (about 20 ms against 5 ms per token for
SmolLM2-135M on two CPU cores), which hides most of what packing buys. :class:`LlamaDecoder`
runs the same computation from the same modules with less around it:

* q/k/v and gate/up projections fused into one linear each (rows concatenated: packed
  ``QuantLinear`` rows are independent, so the fused layer holds the same bytes and computes the
  same outputs; float layers are concatenated too when the copy stays under 64 MB per group,
  and otherwise run one after another);
* one ``rms_norm`` op per norm, rotary embedding for q and k together from precomputed tables
  (taken from the model's own rotary module, so scaled RoPE variants are honoured), one
  ``scaled_dot_product_attention`` call over a preallocated key/value cache;
* the output head applied to the last position only.

Logits equal the model's own forward to float32 rounding (tests/test_fastdecode.py). Models of
another architecture, or with features this loop does not implement (sliding windows, dynamic
RoPE, biases in the MLP), are refused by :func:`LlamaDecoder.supports` and
:func:`qbayes.generate.generate` falls back to the Hugging Face forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QBayesError
from .nn import QuantLinear

_TYPES = ("llama", "mistral", "qwen2")
_ROPE = (None, "default", "linear", "llama3", "yarn", "longrope")


def _unsupported(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _TYPES:
        return f"model type {getattr(cfg, 'model_type', type(model).__name__)!r} (supported: {', '.join(_TYPES)})"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.layers / lm_head"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "pretraining_tp", 1) != 1:
        return "MLP biases or tensor-parallel slicing"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        return f"activation {cfg.hidden_act!r}"
    rope = getattr(getattr(inner, "rotary_emb", None), "rope_type", None)
    if not hasattr(inner, "rotary_emb") or rope not in _ROPE:
        return f"rotary embedding type {rope!r}"
    return None


# float layers are fused by copying their weights: only where the copy is small
FUSE_FLOAT_MAX_BYTES = 64 << 20


def heads(cfg) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dimension) of a Llama-style config."""
    H = cfg.num_attention_heads
    return H, getattr(cfg, "num_key_value_heads", None) or H, getattr(cfg, "head_dim", None) or cfg.hidden_size // H


def activation(cfg):
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
            "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}[getattr(cfg, "hidden_act", "silu")]


def rotary_tables(inner: nn.Module, n: int, dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin_signed`` ``(n, D)`` for positions ``0..n-1`` from the model's own rotary
    module (scaled RoPE variants included). ``rotate_half(x) * sin == roll(x, D/2) * sin_signed``
    with ``sin_signed = [-sin_a, sin_b]``."""
    with torch.no_grad():
        cos, sin = inner.rotary_emb(torch.zeros(1, device=device, dtype=dtype), torch.arange(n, device=device)[None])
    half = cos.shape[-1] // 2
    return cos[0].to(dtype).contiguous(), torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1).to(dtype).contiguous()


def _chunk_attention(q, kk, vv, p0: int, scale: float, gqa: bool) -> torch.Tensor:
    """SDPA of ``T`` queries at positions ``p0..p0+T-1`` over the cached keys ``0..p0+T-1``."""
    T = q.shape[-2]
    if T > 1 and p0 > 0:  # a chunk after earlier tokens: explicit mask
        mask = torch.ones(T, p0 + T, dtype=torch.bool, device=q.device).tril(p0)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, kk, vv, is_causal=T > 1, scale=scale, enable_gqa=gqa)


def _fuse(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([l(x) for l in layers], -1)``, or None if they cannot be fused."""
    if all(type(m) is nn.Linear for m in layers):
        if len({m.weight.dtype for m in layers}) > 1 or len({m.bias is None for m in layers}) > 1:
            return None
        if sum(m.weight.numel() * m.weight.element_size() for m in layers) > FUSE_FLOAT_MAX_BYTES:
            return None
        out = nn.Linear(layers[0].in_features, sum(m.out_features for m in layers), bias=layers[0].bias is not None,
                        device=layers[0].weight.device, dtype=layers[0].weight.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([m.weight for m in layers]))
            if out.bias is not None:
                out.bias.copy_(torch.cat([m.bias for m in layers]))
        return out
    if all(isinstance(m, QuantLinear) for m in layers):
        first = layers[0]
        same = all(m.spec == first.spec and m.in_features == first.in_features and m.scales.dtype == first.scales.dtype
                   and (m.bias is None) == (first.bias is None)
                   and (m.bias is None or m.bias.dtype == first.bias.dtype) for m in layers)
        if not same:
            return None
        out = QuantLinear(first.in_features, sum(m.out_features for m in layers), first.spec,
                          bias=first.bias is not None, bias_dtype=first.bias.dtype if first.bias is not None else
                          torch.float16, device=first.qweight.device)
        for name, buf in out.named_buffers():
            buf.copy_(torch.cat([getattr(m, name) for m in layers]))
        return out
    return None


class _Split(nn.Module):
    """Unfused fallback: the layers one after another, outputs concatenated."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return torch.cat([m(x) for m in self.layers], -1)


class LlamaDecoder:
    """Batch-1 prefill and decode steps with a static key/value cache of ``max_len`` positions.

    >>> dec = LlamaDecoder(model, max_len=256)
    >>> logits = dec.prefill(prompt_ids)          # (vocab,) logits after the prompt
    >>> logits = dec.step(next_id)                # one token at a time
    """

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return _unsupported(model) is None

    def __init__(self, model: nn.Module, max_len: int, use_cpu_ops: bool = True):
        why = _unsupported(model)
        if why is not None:
            raise QBayesError(f"LlamaDecoder does not support this model: {why}")
        cfg = model.config
        inner = model.model
        p = next(model.parameters(), None)
        if p is None:
            p = next(model.buffers())
        self.device, self.dtype = p.device, inner.embed_tokens.weight.dtype
        self.embed = inner.embed_tokens
        self.H, self.KVH, self.D = heads(cfg)
        self.hidden = cfg.hidden_size
        self.max_len = max_len
        self.act = activation(cfg)
        self.layers = []
        for layer in inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv = _fuse([a.q_proj, a.k_proj, a.v_proj]) or _Split([a.q_proj, a.k_proj, a.v_proj])
            gu = _fuse([mlp.gate_proj, mlp.up_proj]) or _Split([mlp.gate_proj, mlp.up_proj])
            self.layers.append((layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, qkv, a.o_proj,
                                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                                gu, mlp.down_proj, getattr(a, "scaling", self.D ** -0.5)))
        self.norm_w, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = model.lm_head
        self.cos, self.sin_signed = rotary_tables(inner, max_len, self.dtype, self.device)  # (max_len, D)
        n = len(self.layers)
        self.k = torch.zeros(n, self.KVH, max_len, self.D, device=self.device, dtype=self.dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0
        self.ops = None  # fused C++ ops for float32 on the CPU (qbayes.kernels.cpu.decode_ops)
        if self.device.type == "cpu" and self.dtype == torch.float32 and use_cpu_ops:
            from .kernels.cpu import decode_ops

            self.ops = decode_ops()
            if self.ops is not None:  # the fused ops read contiguous float32 weights
                self.layers = [(w1.detach().contiguous(), e1, qkv, o, w2.detach().contiguous(), e2, gu, d, sc)
                               for (w1, e1, qkv, o, w2, e2, gu, d, sc) in self.layers]
                self.norm_w = self.norm_w.detach().contiguous()

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[0]
        p0 = self.pos
        if p0 + T > self.max_len:
            raise QBayesError(f"the key/value cache holds {self.max_len} positions; {p0 + T} needed")
        H, KVH, D = self.H, self.KVH, self.D
        x = self.embed(ids)  # (T, hidden)
        if self.ops is not None:
            return self._forward_cpu(x, p0, T)
        cos = self.cos[p0:p0 + T, None]
        sin = self.sin_signed[p0:p0 + T, None]
        for i, (w1, e1, qkv, o_proj, w2, e2, gu, down, scale) in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), w1, e1)
            y = qkv(h)
            qk = y[:, :(H + KVH) * D].view(T, H + KVH, D)
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)
            self.k[i, :, p0:p0 + T] = qk[:, H:].transpose(0, 1)
            self.v[i, :, p0:p0 + T] = y[:, (H + KVH) * D:].view(T, KVH, D).transpose(0, 1)
            q = qk[:, :H].transpose(0, 1)[None]
            kk, vv = self.k[i, :, :p0 + T][None], self.v[i, :, :p0 + T][None]
            o = _chunk_attention(q, kk, vv, p0, scale, KVH != H)
            x = x + o_proj(o[0].transpose(0, 1).reshape(T, H * D))
            h = F.rms_norm(x, (self.hidden,), w2, e2)
            g, u = gu(h).chunk(2, -1)
            x = x + down(self.act(g) * u)
        self.pos = p0 + T
        return self.head(F.rms_norm(x[-1:], (self.hidden,), self.norm_w, self.norm_eps))[0]

    def _forward_cpu(self, x: torch.Tensor, p0: int, T: int) -> torch.Tensor:
        """The same computation with the fused C++ ops: norms (with the residual add), rotary +
        cache write, and single-query attention (prefill chunks use torch's SDPA)."""
        ops, H, KVH, D = self.ops, self.H, self.KVH, self.D
        x = x.contiguous()
        r = None
        for i, (w1, e1, qkv, o_proj, w2, e2, gu, down, scale) in enumerate(self.layers):
            h = ops.rmsnorm(x, w1, e1) if r is None else ops.add_rmsnorm_(x, r, w1, e1)
            y = qkv(h).contiguous()
            ops.rope_cache_(y, self.cos, self.sin_signed, self.k[i], self.v[i], p0, H, KVH)
            if T == 1:
                o = ops.attn_decode(y, self.k[i], self.v[i], p0 + 1, scale, H, KVH)
            else:
                q = y[:, :H * D].view(T, H, D).transpose(0, 1)[None]
                kk, vv = self.k[i, :, :p0 + T][None], self.v[i, :, :p0 + T][None]
                o = _chunk_attention(q, kk, vv, p0, scale, KVH != H)[0].transpose(0, 1).reshape(T, H * D)
            h = ops.add_rmsnorm_(x, o_proj(o), w2, e2)
            g, u = gu(h).chunk(2, -1)
            r = down(self.act(g) * u).contiguous()
        x = x + r
        self.pos = p0 + T
        return self.head(ops.rmsnorm(x[-1:].contiguous(), self.norm_w, self.norm_eps))[0]

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache and run the prompt ``ids`` (``(n,)`` or ``(1, n)``): last-position logits."""
        self.pos = 0
        return self._forward(ids.reshape(-1).to(self.device))

    def step(self, token: int) -> torch.Tensor:
        """Append one token: its logits ``(vocab,)``."""
        return self._forward(torch.tensor([token], device=self.device))
