r"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2): quantizing a
layer's weights (and inputs) shifts the mean of its output,

.. math::  \mathbb E[\tilde y] - \mathbb E[y] = \mathbb E[\tilde W \tilde x] - \mathbb E[W x],

and the shift propagates. Layer by layer in forward order, the mean output of every channel is
measured on calibration data in the float model and in the quantized model (whose earlier layers
are already corrected), and the difference is added to the quantized layer's bias, so each
layer's per-channel output mean matches the float model's on that data. Not
function-preserving by design: it is applied after quantization, against the float model.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, QBayesError
from ..nn import QuantConv2d, QuantLinear

LAYERS = (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)


class _Stop(Exception):
    pass


def _channel_mean(y: torch.Tensor, conv: bool) -> tuple[torch.Tensor, int]:
    y = y.detach().double()
    if conv:
        return y.transpose(0, 1).reshape(y.shape[1], -1).sum(1), y.numel() // y.shape[1]
    return y.reshape(-1, y.shape[-1]).sum(0), y.numel() // y.shape[-1]


def _mean_outputs(model: nn.Module, names: list[str], batches, stop_after: str | None = None) -> dict[str, torch.Tensor]:
    """Per-channel mean output of each named layer over ``batches`` (stopping each forward early
    after ``stop_after`` has run)."""
    mods = dict(model.named_modules())
    sums: dict[str, list] = {n: [0.0, 0] for n in names}

    def hook(name, conv):
        def fn(_m, _a, out):
            s, k = _channel_mean(out, conv)
            sums[name][0] = sums[name][0] + s
            sums[name][1] += k
            if name == stop_after:
                raise _Stop
        return fn

    handles = [mods[n].register_forward_hook(hook(n, isinstance(mods[n], (nn.Conv2d, QuantConv2d)))) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    model(b)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    for n, (s, k) in sums.items():
        if not k:
            raise CalibrationError(f"{n} never ran on the calibration batches: cannot correct its bias")
    return {n: s / k for n, (s, k) in sums.items()}


def _add_to_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    owner = layer.packed if isinstance(layer, QuantConv2d) else layer
    bias = owner.bias
    if bias is None:
        new = delta.float()
        if isinstance(owner, QuantLinear):
            owner.register_buffer("bias", new)
        else:
            owner.bias = nn.Parameter(new)
        return
    with torch.no_grad():
        bias.copy_((bias.double() + delta).to(bias.dtype))


def correct_bias(model: nn.Module, reference: nn.Module, batches: Iterable[torch.Tensor],
                 names: list[str] | None = None, progress: bool = True) -> dict[str, float]:
    """Correct, in place, the biases of the quantized ``model``'s layers against the float
    ``reference`` (same module names) on calibration ``batches`` (input tensors). Returns, per
    layer, the largest per-channel mean shift removed."""
    batches = list(batches)
    if not batches:
        raise CalibrationError("bias correction needs calibration batches")
    qmods, fmods = dict(model.named_modules()), dict(reference.named_modules())
    inner = {n + ".packed" for n, m in qmods.items() if isinstance(m, QuantConv2d)}
    names = names or [n for n, m in qmods.items() if n and isinstance(m, LAYERS) and n not in inner]
    for n in names:
        if not isinstance(qmods.get(n), LAYERS) or not isinstance(fmods.get(n), LAYERS):
            raise QBayesError(f"{n!r} is not a linear/conv layer of both the quantized and the float model")
    target = _mean_outputs(reference, names, batches)
    shifts = {}
    for n in tqdm(names, desc="bias correction", unit="layer", disable=not progress):
        got = _mean_outputs(model, [n], batches, stop_after=n)[n]
        delta = target[n] - got
        _add_to_bias(qmods[n], delta)
        shifts[n] = float(delta.abs().max())
    return shifts
