r"""SmoothQuant (Xiao et al. 2023): move the difficulty of quantizing activations into the weights.

A few input channels of a linear layer carry outliers far larger than the rest, so one range
per tensor (or per token) wastes most of its codes on them. Per input channel ``j``, with
``a_j = max|X_{:,j}|`` over calibration data and ``w_j = max|W_{:,j}|``,

.. math::  s_j = a_j^{α} / w_j^{1-α}, \qquad  y = (X \operatorname{diag}(s)^{-1}) (W \operatorname{diag}(s))^\top

is the same function: the quantizer sees ``X/s`` (flattened channels) and the weights carry
``s`` (a wider but well-behaved per-output-channel range). ``α`` trades one off against the
other; the paper fixes it per model (0.5 for most). Here it is searched per layer: the ``α`` of
a grid (and "no smoothing") that minimises the layer's output error

.. math::  \lVert Q_a(X/s)\, Q_w(W s)^\top - X W^\top \rVert_F^2

on a sample of calibration rows, with ``Q_a`` the activation format (its granularity, min-max
ranges of the sample) and ``Q_w`` round-to-nearest symmetric per-output-channel codes of the
weight bit-width the model will get.

The division by ``s`` runs at the quantizer (``ActQuant.smooth = 1/s``, an element-wise multiply
fused with quantizing, as torchao's smoothed linear does) rather than being folded into a
preceding norm: that stays exact for post-LayerNorm encoders too, whose norm output also feeds a
residual connection.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import CalibrationError, QBayesError
from ..formats import fake_quantize, params_from_range
from .sampling import InputSample, sample_inputs

#: the migration strengths searched (``None``: leave the layer unsmoothed)
ALPHAS = (None, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_SCALE = 1e-5


def smoothing_scale(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """``s = a^α / w^(1-α)`` per input channel (ones where ``alpha`` is None or a channel is dead)."""
    if alpha is None:
        return torch.ones_like(x_amax)
    a, w = x_amax.double(), w_amax.double()
    s = a.clamp(min=MIN_SCALE) ** alpha / w.clamp(min=MIN_SCALE) ** (1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).clamp(min=MIN_SCALE).float()


def _fake_act(x: torch.Tensor, spec) -> torch.Tensor:
    """``x`` (rows, channels) through the activation format with min-max ranges of ``x`` itself."""
    if spec.granularity == "per-token":
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    elif spec.granularity == "per-channel":
        lo, hi = x.amin(0, keepdim=True), x.amax(0, keepdim=True)
    else:
        lo, hi = x.amin(), x.amax()
    s, z = params_from_range(lo, hi, spec.bits, spec.symmetric, None)
    return fake_quantize(x, s, z, spec.bits)


def _fake_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    amax = w.abs().amax(1, keepdim=True)
    s, z = params_from_range(-amax, amax, bits, True, None)
    return fake_quantize(w, s, z, bits)


def output_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, act_spec, w_bits: int) -> float:
    """``‖Q_a(X/s) Q_w(W s)ᵀ − X Wᵀ‖²`` (the criterion of the α search)."""
    ref = x @ w.T
    got = _fake_act(x / s, act_spec) @ _fake_weight(w * s, w_bits).T
    return float((got - ref).double().pow(2).sum())


def search_alpha(x: torch.Tensor, w: torch.Tensor, x_amax: torch.Tensor, act_spec, w_bits: int,
                 alphas=ALPHAS) -> tuple[float | None, torch.Tensor]:
    """The ``α`` of ``alphas`` with the least output error on the rows ``x``, and its ``s``."""
    w_amax = w.abs().amax(0)
    best = None
    for a in alphas:
        s = smoothing_scale(x_amax, w_amax, a)
        err = output_error(x, w, s, act_spec, w_bits)
        if best is None or err < best[0]:
            best = (err, a, s)
    return best[1], best[2]


def smooth_linears(layers: Mapping[str, nn.Linear], run_calibration: Callable[[], None], act_spec,
                   alpha: float | str = "search", w_bits: int = 8, rows: int = 1024) -> dict[str, dict]:
    """Choose ``s`` for every linear of ``layers`` and scale its weight columns by it, in place.

    ``run_calibration()`` must run the model on calibration data (the layers' inputs are
    recorded by hooks). ``alpha`` is a number in [0, 1] (the same for every layer) or
    ``"search"``. Returns ``{name: {"alpha": α or None, "inv_scale": 1/s}}``; the caller makes each
    layer's input quantizer multiply by ``inv_scale``, which keeps the model's function.
    """
    if alpha != "search" and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise QBayesError(f"SmoothQuant's alpha must be in [0, 1] or 'search', got {alpha!r}")
    for name, layer in layers.items():
        if type(layer) is not nn.Linear:
            raise QBayesError(f"SmoothQuant rescales float nn.Linear weights; {name!r} is a "
                              f"{type(layer).__name__} (smooth before quantize_, and convolutions are not smoothed)")
    samples = sample_inputs(layers, run_calibration, lambda _n, _m: InputSample(rows, amax=True))
    out = {}
    with torch.no_grad():
        for name, layer in layers.items():
            st = samples[name]
            if st.amax is None:
                raise CalibrationError(f"{name}: no calibration input reached this layer, so it cannot be smoothed")
            w = layer.weight.detach().float()
            if alpha == "search":
                a, s = search_alpha(st.sample(), w, st.amax, act_spec, w_bits)
            else:
                a, s = float(alpha), smoothing_scale(st.amax, w.abs().amax(0), float(alpha))
            layer.weight.mul_(s.to(layer.weight.dtype))
            out[name] = {"alpha": a, "inv_scale": (1.0 / s)}
    return out
