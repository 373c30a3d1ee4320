r"""RepQ-ViT's scale reparameterisation of post-LayerNorm activations (Li et al. 2023), exact in float.

The output of a LayerNorm, ``y = γ ⊙ x̂ + β``, varies wildly between channels, which a per-tensor
activation range handles badly. With per-channel calibration ranges ``[lo_c, hi_c]`` (widths
``w_c``), scale each channel by ``1/r_c`` with ``r_c = w_c / mean(w)`` and shift it by ``δ_c`` so
that every channel spans the same interval:

.. math::  γ' = γ / r, \quad β' = β / r - δ, \qquad W' = W \operatorname{diag}(r), \quad b' = b + W' δ

for every linear layer ``W, b`` reading the LayerNorm's output. The model computes the same
function; per-tensor quantization of the new activation then equals per-channel quantization of
the old one on the calibration ranges. LayerNorms whose output also feeds anything but linear
layers cannot be rewritten this way; the rewrite checks the model's output on a calibration batch
and refuses (restoring the model) if it changed.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from ..errors import CalibrationError, QBayesError


def reparameterize_layernorms(model: nn.Module, batches: Iterable[torch.Tensor], rtol: float = 1e-4) -> list[str]:
    """Rewrite, in place, every affine ``nn.LayerNorm`` of ``model`` whose output is read by
    ``nn.Linear`` layers; return their names."""
    batches = list(batches)
    if not batches:
        raise CalibrationError("RepQ reparameterisation needs calibration batches")
    mods = dict(model.named_modules())
    norms = {n: m for n, m in mods.items() if isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None}
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    readers: dict[str, set[str]] = {n: set() for n in norms}
    outs: dict[int, tuple[torch.Tensor, str]] = {}  # the tensors are kept, so their ids stay unique

    def norm_hook(name):
        def fn(_m, _a, out):
            o = out.detach().double().reshape(-1, out.shape[-1])
            lo[name] = o.amin(0) if name not in lo else torch.minimum(lo[name], o.amin(0))
            hi[name] = o.amax(0) if name not in hi else torch.maximum(hi[name], o.amax(0))
            outs[id(out)] = (out, name)
        return fn

    def lin_hook(name):
        def fn(_m, args):
            src = outs.get(id(args[0]))
            if src is not None and src[0] is args[0]:
                readers[src[1]].add(name)
        return fn

    handles = [m.register_forward_hook(norm_hook(n)) for n, m in norms.items()]
    handles += [m.register_forward_pre_hook(lin_hook(n)) for n, m in mods.items() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            ref = model(batches[0])
            outs.clear()
            for b in batches[1:]:
                model(b)
                outs.clear()
    finally:
        for h in handles:
            h.remove()
    backup = copy.deepcopy(model.state_dict())
    done = []
    with torch.no_grad():
        for n, ln in norms.items():
            if not readers[n] or n not in lo or any(mods[x].bias is None for x in readers[n]):
                continue
            w = (hi[n] - lo[n]).clamp(min=1e-12)
            r = w / w.mean()
            delta = lo[n] / r - (lo[n] / r).mean()
            ln.weight.copy_((ln.weight.double() / r).to(ln.weight.dtype))
            ln.bias.copy_((ln.bias.double() / r - delta).to(ln.bias.dtype))
            for lname in readers[n]:
                lin = mods[lname]
                wn = lin.weight.double() * r
                lin.weight.copy_(wn.to(lin.weight.dtype))
                shift = wn @ delta
                if lin.bias is None:
                    lin.bias = nn.Parameter(shift.to(lin.weight.dtype))
                else:
                    lin.bias.copy_((lin.bias.double() + shift).to(lin.bias.dtype))
            done.append(n)
        out = model(batches[0])
        if not torch.allclose(out, ref, rtol=rtol, atol=rtol * float(ref.abs().max())):
            model.load_state_dict(backup)
            raise QBayesError("RepQ reparameterisation changed the model's output: a LayerNorm's output feeds "
                              "something other than linear layers; the model is restored")
    return done
