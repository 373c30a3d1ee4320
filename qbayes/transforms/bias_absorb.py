r"""High-bias absorption (Nagel et al. 2019, "Data-Free Quantization", §4.1), with the shift
measured on calibration data instead of read from batch-norm statistics.

For a chain ``z = W_1 x + b_1 → f → W_2`` where ``f`` clamps to ``[lo, hi]`` (ReLU, ReLU6, a
per-channel clip), let ``c_i ≥ 0`` be the smallest value channel ``i`` of ``f(z)`` takes on the
calibration data. Then

.. math::  f(z) = f'(z - c) + c, \qquad f' = \mathrm{clamp}(\cdot,\ lo - c,\ hi - c),

so ``b_1 ← b_1 − c``, ``f ← f'`` (a :class:`~.graph.ChannelClip`) and ``b_2 ← b_2 + W_2 c`` give
the same function *everywhere*, while the activation that gets quantized no longer carries the
per-channel offsets ``c`` (a per-tensor range then covers less). Consumers with zero padding are
skipped: their padded border would read ``0`` where the shifted activation means ``c``.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import CalibrationError, QBayesError
from ..nn import set_module
from .graph import CLIPPED, POS_HOMOGENEOUS, ChannelClip, chains


def _bounds(act: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(act, ChannelClip):
        return act.lo.double().clone(), act.hi.double().clone()
    lo, hi = (0.0, float("inf")) if isinstance(act, nn.ReLU) else (0.0, 6.0) if isinstance(act, nn.ReLU6) \
        else (float(act.min_val), float(act.max_val))
    return torch.full((n,), lo, dtype=torch.float64), torch.full((n,), hi, dtype=torch.float64)


def absorb_high_bias(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Absorb the per-channel offsets of every eligible ``layer → clamp → layer`` chain of
    ``model`` (eval mode, batch norms folded) in place; return the largest offset moved per chain."""
    if model.training:
        raise QBayesError("absorb_high_bias needs the model in eval mode (model.eval())")
    batches = list(batches)
    if not batches:
        raise CalibrationError("high-bias absorption needs calibration batches")
    todo = []
    for c in chains(model):
        if c.consumer is None or c.act is None or c.norm is not None:
            continue
        act, prod, cons = (model.get_submodule(n) for n in (c.act, c.producer, c.consumer))
        if not isinstance(act, POS_HOMOGENEOUS + CLIPPED) or prod.bias is None:
            continue
        if isinstance(cons, nn.Conv2d) and (any(p != 0 for p in ((cons.padding,) if isinstance(cons.padding, int)
                                                               else cons.padding)) or cons.padding == "same"):
            continue
        todo.append(c)
    mins: dict[str, torch.Tensor] = {}

    def hook(name, conv):
        def fn(_m, _a, out):
            o = out.detach().double()
            m = o.transpose(0, 1).reshape(o.shape[1], -1).amin(1) if conv else o.reshape(-1, o.shape[-1]).amin(0)
            mins[name] = m if name not in mins else torch.minimum(mins[name], m)
        return fn

    handles = [model.get_submodule(c.act).register_forward_hook(
        hook(c.act, isinstance(model.get_submodule(c.producer), nn.Conv2d))) for c in todo]
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()
    moved = {}
    with torch.no_grad():
        for c in todo:
            if c.act not in mins:
                continue
            prod, cons, act = (model.get_submodule(n) for n in (c.producer, c.consumer, c.act))
            shift = mins[c.act].clamp(min=0.0)
            if not bool((shift > 0).any()):
                continue
            lo, hi = _bounds(act, shift.numel())
            dim = 1 if isinstance(prod, nn.Conv2d) else -1
            set_module(model, c.act, ChannelClip((lo - shift).to(prod.bias.dtype), (hi - shift).to(prod.bias.dtype), dim))
            prod.bias.sub_(shift.to(prod.bias.dtype))
            w2 = cons.weight.double()
            if isinstance(cons, nn.Conv2d) and cons.groups > 1:  # depthwise-style: filter i reads channel i's group
                per = cons.in_channels // cons.groups
                add = (w2.sum((2, 3)) * shift.view(cons.groups, per).repeat_interleave(
                    cons.out_channels // cons.groups, 0)).sum(1)
            else:
                add = (w2.sum((2, 3)) if w2.dim() == 4 else w2) @ shift
            if cons.bias is None:
                cons.bias = nn.Parameter(add.to(cons.weight.dtype))
            else:
                cons.bias.add_(add.to(cons.bias.dtype))
            moved[f"{c.producer}->{c.consumer}"] = float(shift.max())
    return moved
