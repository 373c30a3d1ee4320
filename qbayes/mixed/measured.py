"""The ground truth the other criteria are judged against: the measured increase of the mean
next-token loss when one layer alone is quantized (every other layer in float).

A perturbation in decoder block ``k`` leaves blocks ``0..k-1`` unchanged, so their output on the
sensitivity set is computed once and replayed: blocks before ``k`` are swapped for stubs that
return the cached hidden state, and only blocks ``k..`` run (half the model on average).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import adapter_for
from .stats import check_batches, next_token_loss


class _Replay(nn.Module):
    """Stands in for a decoder block: returns the cached input of the first live block."""

    def __init__(self, cache: list[torch.Tensor], state: dict):
        super().__init__()
        self.cache, self.state = cache, state

    def forward(self, *args, **kwargs):
        return self.cache[self.state["batch"]]


def _block_of(name: str, prefix: str) -> int:
    return int(name[len(prefix) + 1:].split(".", 1)[0])


@torch.no_grad()
def measured_increase(model: nn.Module, layers: Mapping[str, nn.Linear], batches,
                      deltas: Mapping[str, Mapping[int, torch.Tensor]], progress: bool = True) -> dict[str, dict[int, float]]:
    """``{layer: {bits: L(W with that layer at W + ΔW) - L(W)}}`` on ``batches``, one layer at a time."""
    batches = check_batches(batches)
    adapter = adapter_for(model)
    blocks = adapter.blocks()
    prefix = adapter.blocks_path
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [b.register_forward_pre_hook(lambda _m, args, kwargs, i=i: inputs[i].append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True) for i, b in enumerate(blocks)]
    base = 0.0
    try:
        for ids in batches:
            base += float(next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)) / len(batches)
    finally:
        for h in hooks:
            h.remove()
    originals = list(blocks)
    state = {"batch": 0}
    out: dict[str, dict[int, float]] = {}
    total = sum(len(deltas[n]) for n in layers)
    bar = tqdm(total=total, desc="measured loss increase", unit="eval", disable=not progress)
    try:
        for name, lin in layers.items():
            k = _block_of(name, prefix)
            stub = _Replay(inputs[k], state)
            for i in range(k):
                blocks[i] = stub
            w0 = lin.weight.detach().clone()
            out[name] = {}
            for b, d in sorted(deltas[name].items()):
                lin.weight.copy_(w0 + d.to(w0))
                loss = 0.0
                for j, ids in enumerate(batches):
                    state["batch"] = j
                    loss += float(next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)) / len(batches)
                out[name][b] = loss - base
                bar.update()
            lin.weight.copy_(w0)
            for i in range(k):
                blocks[i] = originals[i]
    finally:
        bar.close()
        for i, blk in enumerate(originals):
            blocks[i] = blk
    return out
