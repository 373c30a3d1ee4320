r"""Cross-layer equalisation (Nagel et al. 2019, "Data-Free Quantization"): for a layer pair
``W1 → f → W2`` with ``f`` positively homogeneous (ReLU), scaling output channel ``i`` of ``W1``
(and its bias) by ``1/s_i`` and input channel ``i`` of ``W2`` by ``s_i`` leaves the function
unchanged. With :math:`r^{(1)}_i = \max|W_1[i,:]|` and :math:`r^{(2)}_i = \max|W_2[:,i]|`,

.. math::  s_i = \sqrt{r^{(1)}_i / r^{(2)}_i}

gives both the same range :math:`\sqrt{r^{(1)}_i r^{(2)}_i}`, which is what per-tensor weight
quantization needs. ``ReLU6``/``Hardtanh`` clip at fixed values, which scaling would move: they are
replaced by a :class:`ChannelClip` whose per-channel bounds are scaled with the channel, so the
function stays exact. A depthwise consumer's "input channel ``i``" is its filter ``i``. Pairs are
swept repeatedly (a layer between two pairs is rescaled from both sides) until the scales settle.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import QBayesError
from ..nn import set_module
from .graph import CLIPPED, ChannelClip, Chain, chains, out_channel_view


def _input_ranges(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        if layer.groups != layer.in_channels or layer.out_channels != layer.in_channels:
            raise QBayesError("cross-layer equalisation handles dense and depthwise convs, not grouped ones")
        return out_channel_view(w).abs().amax(1)  # depthwise: filter i reads channel i only
    return w.transpose(0, 1).reshape(w.shape[1], -1).abs().amax(1)


def _scale_input(layer: nn.Module, s: torch.Tensor) -> None:
    w = layer.weight
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        w.mul_(s.view(-1, *([1] * (w.dim() - 1))))
    else:
        w.mul_(s.view(1, -1, *([1] * (w.dim() - 2))))


def _rescale_clip(model: nn.Module, c: Chain, s: torch.Tensor) -> None:
    act = model.get_submodule(c.act)
    if isinstance(act, ChannelClip):
        act.lo.div_(s)
        act.hi.div_(s)
        return
    lo, hi = (0.0, 6.0) if isinstance(act, nn.ReLU6) else (act.min_val, act.max_val)
    dim = 1 if isinstance(model.get_submodule(c.producer), nn.Conv2d) else -1
    ones = torch.ones_like(s)
    set_module(model, c.act, ChannelClip(lo * ones / s, hi * ones / s, channel_dim=dim))


def equalize(model: nn.Module, max_sweeps: int = 20, tol: float = 1e-6) -> list[tuple[str, str]]:
    """Equalise every ``layer → (ReLU | ReLU6 | none) → layer`` pair of ``model`` in place (fold
    batch norms first); return the pairs."""
    pairs = [c for c in chains(model) if c.consumer is not None]
    if any(c.norm is not None for c in pairs):
        raise QBayesError("equalize: a batch norm sits between two layers; run fold_batchnorm first")
    with torch.no_grad():
        for _ in range(max_sweeps):
            worst = 0.0
            for c in pairs:
                w1, w2 = model.get_submodule(c.producer), model.get_submodule(c.consumer)
                r1 = out_channel_view(w1.weight.detach()).abs().amax(1).double()
                r2 = _input_ranges(w2).double()
                if r1.shape != r2.shape:
                    raise QBayesError(f"{c.producer} gives {r1.numel()} channels but {c.consumer} reads {r2.numel()}")
                ok = (r1 > 0) & (r2 > 0)
                s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1)), torch.ones_like(r1))
                worst = max(worst, float((s.log().abs()).max()))
                s32 = s.to(w1.weight.dtype)
                w1.weight.div_(s32.view(-1, *([1] * (w1.weight.dim() - 1))))
                if w1.bias is not None:
                    w1.bias.div_(s32)
                _scale_input(w2, s32)
                if c.act is not None and isinstance(model.get_submodule(c.act), CLIPPED):
                    _rescale_clip(model, c, s32)
            if worst < tol:
                break
    return [(c.producer, c.consumer) for c in pairs]
