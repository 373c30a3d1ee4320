r"""NoisyQuant (Liu et al. 2023, "NoisyQuant: Noisy Bias-Enhanced Post-Training Activation
Quantization for Vision Transformers"): a fixed noisy bias added before an activation quantizer
and removed after it,

.. math::  \hat x = Q(x + N) - N, \qquad N_c \sim \mathcal U(-K/2,\ K/2) \text{ per input channel } c,

sampled once and then fixed. In a linear layer ``Q(x + N) Wᵀ + (b − N Wᵀ)`` is the paper's
"noisy bias" ``N`` and "denoising bias" ``−N Wᵀ`` folded into the layer bias
(:func:`denoising_bias`); in float it is the identity. Here the subtraction runs at the quantizer
(:attr:`ActQuant.noise <qbayes.nn.act_quant.ActQuant>`, added after SmoothQuant's ``smooth``), so
it is exact for zero-padded convolutions too, whose border outputs a folded bias would miss.

Why it can help: one value's rounding error depends on where it sits in its quantization bin,
``(x − ⌊x⌉_Δ)²``; with ``K = Δ`` and the noise averaged over, it is ``Δ²/12`` wherever ``x`` sits.
A heavy-tailed activation (the post-GELU input of a ViT's fc2) piles its many small values at
fixed spots inside the wide bins its outliers force (GELU's negative lobe near ``−0.17``): where
those spots lie near bin edges the noise lowers the error, where they lie on a grid point
(``0`` is one) it raises it. Whether it helps is a property of the layer, so ``K`` is searched
per layer, "no noise" included.

The search (:func:`add_noisy_bias`): for each layer, ``K = k Δ`` for ``k`` in :data:`GRID`
(``Δ`` the quantizer's frozen step, per channel for per-channel ranges) with one fixed draw
``u ~ U(−½, ½)^C`` (``N = K u``, the generator seeded from ``seed`` and the layer name), keeping
the ``k`` with the least layer *output* error

.. math::  \lVert (\hat x - x)\, W^\top \rVert_F^2

(``x`` the quantizer's input after smoothing, on a sample of calibration rows; ``W`` the weight the
layer applies, float or dequantized; for a convolution the convolution of ``x̂ − x`` without
bias). The quantizer's frozen range is kept: a value the noise pushes past it is clipped, and that
error is part of the criterion. ``K = 0`` is always a candidate, so on the sample the chosen noise
is never worse than none.

Limits: static integer input quantizers only. Logarithmic formats are refused (they code
non-negative values, which the noise would make negative) and so are dynamic ranges (no fixed
``Δ`` to measure ``K`` in). The QDQ ONNX export adds ``N`` before its ``QuantizeLinear`` and subtracts
it after the ``DequantizeLinear``; the integer kernels (:func:`qbayes.to_int8_`) quantize
``x + N`` and remove ``N``'s response after the GEMM (folded into a linear's bias; for a
convolution a cached response map, so zero padding stays exact).
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CalibrationError, QBayesError
from ..nn import QuantConv2d, QuantLinear
from ..nn.act_quant import ActQuant
from .sampling import InputSample, sample_inputs

#: noise amplitudes searched, in units of the quantizer's step ``Δ`` (0: no noise)
GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
LAYERS = (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)


def uniform_draw(channels: int, seed: int, name: str) -> torch.Tensor:
    """The fixed ``u ~ U(−½, ½)^channels`` of layer ``name`` (float64), reproducible from ``seed``."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    return torch.rand(channels, generator=g, dtype=torch.float64) - 0.5


def noise_for(quant: ActQuant, u: torch.Tensor, k: float) -> torch.Tensor | None:
    """``N = k Δ u`` per channel for a frozen ``quant`` (``None`` when ``k`` is 0)."""
    if k == 0:
        return None
    step = quant.scale.detach().double().flatten().cpu()
    return (k * step * u).float().to(quant.scale.device)


def denoising_bias(layer: nn.Module) -> torch.Tensor:
    """NoisyQuant's denoising bias ``−N Wᵀ`` of a layer whose input quantizer carries ``noise``:
    added to the layer bias, it lets an integer kernel quantize ``x + N`` and skip ``− N``. For a
    convolution it is ``−Σ_{kh,kw} W N`` (exact away from zero padding only)."""
    quant = getattr(layer, "input_quant", None)
    if not isinstance(quant, ActQuant) or quant.noise is None:
        raise QBayesError("denoising_bias: this layer's input quantizer carries no NoisyQuant noise")
    w = _weight(layer).double()
    n = quant.noise.double().to(w.device)
    if w.dim() == 2:
        return -(w @ n)
    groups = layer.groups
    wsum = w.sum((2, 3)).view(groups, w.shape[0] // groups, -1)   # (groups, out/groups, in/groups)
    return -torch.einsum("goi,gi->go", wsum, n.view(groups, -1)).reshape(-1)


def _weight(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, (QuantLinear, QuantConv2d)):
        return layer.dequantize(torch.float32)
    return layer.weight.detach().float()


def _output_map(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``d ↦ d Wᵀ`` (or the convolution of ``d``, bias excluded) for the weight ``layer`` applies."""
    w = _weight(layer)
    if isinstance(layer, nn.Conv2d):
        return lambda d: layer._conv_forward(d, w, None)
    if isinstance(layer, QuantConv2d):
        return lambda d: F.conv2d(d, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return lambda d: d @ w.T


def _check(layers: Mapping[str, nn.Module], grid, seed, rows) -> tuple[float, ...]:
    if not layers:
        raise QBayesError("add_noisy_bias: no layers given")
    for name, layer in layers.items():
        quant = getattr(layer, "input_quant", None)
        if not isinstance(layer, LAYERS) or not isinstance(quant, ActQuant):
            raise QBayesError(f"NoisyQuant: {name!r} is not a linear/conv layer with an input quantizer "
                              "(put one there with qbayes.quantize_activations_ or quantize_inputs first)")
        if quant.spec.format != "int":
            raise QBayesError(f"NoisyQuant: {name!r} quantizes its input with {quant.spec.format} codes; the noisy "
                              "bias needs integer codes (log formats code non-negative values only)")
        if quant.spec.dynamic:
            raise QBayesError(f"NoisyQuant: {name!r} has a dynamic activation range; the noise amplitude is searched "
                              "in units of a frozen step, so use static ranges (dynamic=False)")
    try:
        ks = sorted({0.0, *(float(k) for k in grid)})
    except (TypeError, ValueError):
        raise QBayesError(f"NoisyQuant's grid must be numbers (multiples of the step Δ), got {grid!r}") from None
    if not all(math.isfinite(k) and k >= 0 for k in ks):
        raise QBayesError(f"NoisyQuant's grid must hold finite non-negative multiples of Δ, got {tuple(grid)!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise QBayesError(f"NoisyQuant's seed must be an integer, got {seed!r}")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise QBayesError(f"NoisyQuant's rows must be a positive integer, got {rows!r}")
    return tuple(ks)


def search_noise(layer: nn.Module, x: torch.Tensor, u: torch.Tensor, grid: Iterable[float] = GRID
                 ) -> tuple[float, dict[float, float]]:
    """The ``k`` of ``grid`` whose noise ``k Δ u`` gives ``layer`` the least output error on the
    inputs ``x`` (through its frozen ``input_quant``), and the error of every ``k``. Leaves the
    quantizer's ``noise`` as it found it."""
    quant, fmap = layer.input_quant, _output_map(layer)
    ref = x if quant.smooth is None else x * quant._channel_view(quant.smooth, x)
    saved, errors = quant.noise, {}
    try:
        with torch.no_grad():
            for k in grid:
                quant.noise = noise_for(quant, u, k)
                errors[k] = float(fmap(quant(x) - ref).double().pow(2).sum())
    finally:
        quant.noise = saved
    best = min(errors, key=lambda k: (errors[k], k))  # ties: the smaller amplitude
    return best, errors


def add_noisy_bias(layers: Mapping[str, nn.Module], run_calibration: Callable[[], None], *,
                   grid: Iterable[float] = GRID, seed: int = 0, rows: int = 1024) -> dict[str, dict]:
    """Search and set NoisyQuant's noise on the input quantizer of every layer of ``layers``, in place.

    Args:
        layers: ``{name: layer}``, each an ``nn.Linear`` / ``nn.Conv2d`` (or packed
            ``QuantLinear`` / ``QuantConv2d``) whose ``input_quant`` is a static integer
            :class:`~qbayes.nn.act_quant.ActQuant` (as :func:`qbayes.quantize_activations_` leaves them).
        run_calibration: runs the model on calibration data; the quantizers' inputs are sampled by
            hooks during it. A quantizer still observing also observes this run and is frozen
            after it (its range is that of the noiseless inputs).
        grid: the amplitudes ``K / Δ`` tried (``0`` is always added).
        seed: seeds the fixed draw of every layer (with the layer name), so a run is reproducible.
        rows: input rows (positions, for a convolution) sampled per layer.

    Returns ``{name: {"k": K/Δ, "amplitude": K (the largest over channels for per-channel ranges),
    "error": output error with the chosen noise, "error_without": without noise}}`` (errors summed
    over the sample). A layer where no noise is best keeps ``noise = None``; any noise a quantizer
    already had is replaced.
    """
    ks = _check(layers, grid, seed, rows)
    quants = {n: m.input_quant for n, m in layers.items()}
    samples = sample_inputs(quants, run_calibration,
                            lambda n, _q: InputSample(rows, conv=isinstance(layers[n], (nn.Conv2d, QuantConv2d))))
    out = {}
    for name, layer in layers.items():
        quant, st = quants[name], samples[name]
        if not st.kept:
            raise CalibrationError(f"{name}: no calibration input reached this layer, so NoisyQuant cannot search "
                                   "its noise")
        if quant.scale is None:
            try:
                quant.freeze()
            except CalibrationError as e:
                raise CalibrationError(f"{name}: {e}") from None
        x = st.sample()
        u = uniform_draw(x.shape[1] if st.conv else x.shape[-1], seed, name)
        k, errors = search_noise(layer, x, u, ks)
        quant.noise = noise_for(quant, u, k)
        out[name] = {"k": k, "amplitude": k * float(quant.scale.detach().max()), "error": errors[k],
                     "error_without": errors[0.0]}
    return out
