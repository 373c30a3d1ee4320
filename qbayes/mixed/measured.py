"""The ground truth the other criteria are judged against: the measured increase of the model's
mean loss (its adapter's, with observed targets: next-token cross-entropy for an LM) when one
layer alone is quantized (every other layer in float).

A perturbation in block ``k`` leaves blocks ``0..k-1`` unchanged, so what block ``k-1`` returns
on the sensitivity set is computed once and replayed: blocks before ``k`` are swapped for stubs
that return it, and only blocks ``k..`` run (half the model on average).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.adapter import adapter_for
from ..nn import set_module


class _Replay(nn.Module):
    """Stands in for a block before the first live one: returns what the block before that
    one returned, cached."""

    def __init__(self, cache: list[torch.Tensor], state: dict):
        super().__init__()
        self.cache, self.state = cache, state

    def forward(self, *args, **kwargs):
        return self.cache[self.state["batch"]]


def _block_of(name: str, blocks: list[tuple[str, nn.Module]]) -> int:
    return next(i for i, (b, _) in enumerate(blocks) if not b or name.startswith(b + "."))


@torch.no_grad()
def measured_increase(model: nn.Module, layers: Mapping[str, nn.Linear], batches,
                      deltas: Mapping[str, Mapping[int, torch.Tensor]], progress: bool = True) -> dict[str, dict[int, float]]:
    """``{layer: {bits: L(W with that layer at W + ΔW) - L(W)}}`` on ``batches``, one layer at a time."""
    adapter = adapter_for(model)
    batches = adapter.batches(batches)
    blocks = adapter.blocks()
    returned: list[list] = [[] for _ in blocks]
    hooks = [b.register_forward_hook(lambda _m, _a, out, i=i: returned[i].append(out)) for i, (_, b) in enumerate(blocks)]
    base = 0.0
    try:
        for b in batches:
            base += float(adapter.loss(b)) / len(batches)
    finally:
        for h in hooks:
            h.remove()
    state = {"batch": 0}
    out: dict[str, dict[int, float]] = {}
    total = sum(len(deltas[n]) for n in layers)
    bar = tqdm(total=total, desc="measured loss increase", unit="eval", disable=not progress)
    try:
        for name, lin in layers.items():
            k = _block_of(name, blocks)
            if k:
                stub = _Replay(returned[k - 1], state)
                for bname, _ in blocks[:k]:
                    set_module(adapter.model, bname, stub)
            w0 = lin.weight.detach().clone()
            out[name] = {}
            for bits, d in sorted(deltas[name].items()):
                lin.weight.copy_(w0 + d.to(w0))
                loss = 0.0
                for j, b in enumerate(batches):
                    state["batch"] = j
                    loss += float(adapter.loss(b)) / len(batches)
                out[name][bits] = loss - base
                bar.update()
            lin.weight.copy_(w0)
            for bname, blk in blocks[:k]:
                set_module(adapter.model, bname, blk)
    finally:
        bar.close()
        for bname, blk in blocks:
            if bname:
                set_module(adapter.model, bname, blk)
    return out
