r"""Quantization points inside the attention of Hugging Face models (BERT, ViT, Llama, …).

``transformers`` computes attention in a function it looks up by the model's
``config._attn_implementation`` (its ``AttentionInterface``: ``"eager"``, ``"sdpa"``, …). qbayes
registers one more, :data:`IMPLEMENTATION`, that computes the eager attention of
``transformers``

.. math::  O = \mathrm{softmax}\big((s\,Q) K^\top + M\big)\, V,

with the four operands of its two matmuls passed through named ``nn.Identity`` modules of the
attention layer: ``q_point`` (the scaled queries ``sQ``), ``k_point``, ``probs_point`` (the
softmax output) and ``v_point`` — the names qbayes's own ViT uses, so
:func:`qbayes.quantize_activations_` turns them into activation quantizers the same way for
every model. With the points still identities the function is eager attention (the tests
check the logits against the original model's). ``M`` is ``transformers``' additive eager mask;
grouped-query attention repeats keys and values to the query heads first, as the eager path
does. Logit soft-capping (Gemma 2) is refused.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import QBayesError

IMPLEMENTATION = "qbayes_points"
#: operand points of the two matmuls, then the softmax output
MATMUL_POINTS = ("q_point", "k_point", "v_point")
SOFTMAX_POINTS = ("probs_point",)
POINTS = MATMUL_POINTS + SOFTMAX_POINTS


def points_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the quantization points of ``module`` (``(batch, heads, seq, dim)``
    operands; returns ``(batch, seq, heads, dim)`` and the attention probabilities)."""
    if kwargs.get("softcap") is not None:
        raise QBayesError("attention with logit soft-capping has no qbayes quantization points")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    point = functools.partial(_point, module)
    scores = point("q_point", query * scaling) @ point("k_point", key).transpose(-2, -1)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = point("probs_point", probs) @ point("v_point", value)
    return out.transpose(1, 2).contiguous(), probs


def _point(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    fn = getattr(module, name, None)
    return x if fn is None else fn(x)


@functools.lru_cache(maxsize=None)
def _dispatches(cls: type) -> bool:
    """Whether ``cls.forward`` looks its attention function up in ``transformers``' interface."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def attention_modules(model: nn.Module) -> list[str]:
    """Qualified names of the attention layers of ``model`` that compute through the interface."""
    return [n for n, m in model.named_modules() if _dispatches(type(m))]


def register() -> None:
    """Make :data:`IMPLEMENTATION` known to ``transformers`` (attention and mask functions)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, points_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def add_attention_points(model: nn.Module) -> list[str]:
    """Give every attention layer of the Hugging Face ``model`` the four identity points and
    switch the model to :data:`IMPLEMENTATION`; returns the point names (idempotent)."""
    layers = attention_modules(model)
    if not layers:
        return []
    if not hasattr(model, "set_attn_implementation"):
        raise QBayesError(f"{type(model).__name__} is not a transformers model: cannot switch its attention")
    register()
    names = []
    for layer in layers:
        mod = model.get_submodule(layer)
        for p in POINTS:
            if not hasattr(mod, p):
                setattr(mod, p, nn.Identity())
            names.append(f"{layer}.{p}")
    if model.config._attn_implementation != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)
    return names


def exposed_points(model: nn.Module) -> list[str]:
    """The attention points ``model`` already has (``nn.Identity`` or quantizers at those names)."""
    return [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in POINTS]
