r"""Perplexity of a causal LM on token windows.

.. math:: \mathrm{PPL} = \exp\Big(\frac{1}{N}\sum_{w}\sum_{t=1}^{T-1} -\log p(x^w_{t+1} \mid x^w_{\le t})\Big)

over every next-token prediction inside each window (windows are independent: no context
carried across).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 2, progress: bool = True) -> float:
    """Perplexity of ``model`` on ``windows`` (``(n, seqlen)`` token ids)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    bar = tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress)
    for ids in bar:
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        for lg, y in zip(logits, ids):  # one window at a time: no copy of the whole logits tensor
            total += float(nn.functional.cross_entropy(lg[:-1].float(), y[1:], reduction="sum"))
        del logits
        count += ids[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    return math.exp(total / count)
