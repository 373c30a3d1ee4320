r"""Activation quantizers: :class:`ActQuant` fake-quantizes a tensor as an
:class:`~qbayes.spec.ActSpec` says, and :func:`quantize_inputs` puts one in front of layers.

A static quantizer first *observes* (it passes inputs through unchanged and feeds its observer),
then :meth:`ActQuant.freeze` fixes ``scale``/``zero`` (saved with the module's state dict) and it
quantizes from then on. A dynamic one computes the range of every input it sees (per tensor,
per token — each row over the last dimension — or per channel). Integer codes follow the
weight formats' affine rule, ``x̂ = s (clamp(⌊x/s⌉ + z, 0, 2^b − 1) − z)``; the log formats
follow :mod:`qbayes.formats.log2`. Gradients pass straight through the rounding. A quantizer may
carry SmoothQuant's per-channel ``smooth = 1/s`` (:mod:`qbayes.transforms.smoothquant`): it
quantizes ``x ⊙ smooth`` and its layer's weight columns carry ``s``. It may also carry NoisyQuant's
fixed per-channel ``noise`` ``N`` (Liu et al. 2023, :mod:`qbayes.transforms.noisyquant`; integer
formats only), added after smoothing and removed after quantizing,

.. math::  \hat x = Q(x \odot \mathrm{smooth} + N) - N,

which is the identity in float (in a linear layer ``−N Wᵀ`` is NoisyQuant's "denoising bias"). A
static quantizer still observing sees ``x ⊙ smooth + N``, so its range covers the noisy values.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import QBayesError
from ..formats import fake_quantize, params_from_range
from ..formats.log2 import log_fake_quantize
from ..observers import act_params, make_observer
from ..spec import ActSpec


class ActQuant(nn.Module):
    """Fake-quantizer for one activation tensor.

    Args:
        spec: the activation format.
        channel_axis: the channel dimension for per-channel ranges (``-1`` for a linear's input,
            ``1`` for a convolution's).
    """

    def __init__(self, spec: ActSpec, channel_axis: int = -1):
        super().__init__()
        if not isinstance(spec, ActSpec):
            raise QBayesError(f"ActQuant takes an ActSpec, got {type(spec).__name__}")
        self.spec, self.channel_axis = spec, channel_axis
        self.observer = None if spec.dynamic else make_observer(spec, channel_axis)
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self.register_buffer("smooth", None)  # SmoothQuant's 1/s per channel, applied before quantizing
        self.register_buffer("noise", None)  # NoisyQuant's fixed bias per channel: Q(x + noise) - noise

    @property
    def calibrated(self) -> bool:
        return self.spec.dynamic or self.scale is not None

    def freeze(self) -> None:
        """Fix the static range from what the observer saw (raises if it saw nothing)."""
        if self.spec.dynamic:
            return
        self.scale, self.zero = act_params(*self.observer.range(), self.spec)
        self.observer = None

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` broadcastable against ``x`` (computed from ``x`` when dynamic)."""
        spec = self.spec
        if not spec.dynamic:
            if self.scale is None:
                raise QBayesError("this activation quantizer is not calibrated: observe calibration batches and "
                                  "call freeze() (qbayes.quantize_activations_ does both)")
            return self._shaped(self.scale, x), self._shaped(self.zero, x)
        xd = x.detach()
        if spec.format != "int":
            return xd.amax().clamp(min=torch.finfo(torch.float32).tiny), torch.zeros((), device=x.device)
        if spec.granularity == "per-token":
            lo, hi = xd.amin(-1, keepdim=True), xd.amax(-1, keepdim=True)
        elif spec.granularity == "per-channel":
            axis = self.channel_axis % x.dim()
            dims = [d for d in range(x.dim()) if d != axis]
            lo, hi = xd.amin(dims, keepdim=True), xd.amax(dims, keepdim=True)
        else:
            lo, hi = xd.amin(), xd.amax()
        return params_from_range(lo.float(), hi.float(), spec.bits, spec.symmetric, None)

    def _shaped(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            return t
        return self._channel_view(t, x)

    def _channel_view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis % x.dim()] = t.numel()
        return t.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:  # the layer's weight columns carry s (qbayes.transforms.smoothquant)
            x = x * self._channel_view(self.smooth, x).to(x.dtype)
        noise = None
        if self.noise is not None:  # NoisyQuant (qbayes.transforms.noisyquant): Q(x + N) - N
            if self.spec.format != "int":
                raise QBayesError(f"NoisyQuant's noisy bias needs integer activation codes, not {self.spec.format}: "
                                  "set this quantizer's noise to None")
            noise = self._channel_view(self.noise, x).float()
        if not self.spec.dynamic and self.scale is None:
            self.observer.update(x if noise is None else x.detach().float() + noise)
            return x
        xf = x.detach().float() if noise is None else x.detach().float() + noise
        s, z = self.params(xf)
        if self.spec.format == "int":
            q = fake_quantize(xf, s, z, self.spec.bits)
        else:
            q = log_fake_quantize(xf, s, self.spec.bits, self.spec.format)
        if noise is not None:
            q = q - noise
        return x + (q.to(x.dtype) - x).detach()  # straight-through gradient

    def extra_repr(self) -> str:
        return f"{self.spec}, calibrated={self.calibrated}"


def _pre_hook(module: nn.Module, args):
    return (module.input_quant(args[0]), *args[1:])


def quantize_inputs(model: nn.Module, names, spec: ActSpec) -> dict[str, ActQuant]:
    """Quantize the first input of each named ``nn.Linear`` / ``nn.Conv2d`` of ``model``.

    The quantizer becomes the layer's child ``input_quant`` (so its scale is in the state dict)
    and runs in a forward pre-hook. Returns ``{name: quantizer}``.
    """
    from .quant_conv import QuantConv2d
    from .quant_linear import QuantLinear

    mods = dict(model.named_modules())
    out = {}
    for name in names:
        layer = mods.get(name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)):
            raise QBayesError(f"{name!r} is not a Linear or Conv2d layer of the model: activation quantization "
                              "points go in front of linear and convolution layers")
        if hasattr(layer, "input_quant"):
            raise QBayesError(f"{name!r} already has an input quantizer")
        out[name] = attach_input_quant(layer, ActQuant(spec, channel_axis=1 if isinstance(
            layer, (nn.Conv2d, QuantConv2d)) else -1))
    return out


def calibrate_input_quant(layer: nn.Module, spec: ActSpec, calib: torch.Tensor) -> nn.Module:
    """Put an input quantizer on one layer and, if static, calibrate it on ``calib`` (one batch);
    returns the layer. (Whole models: :func:`qbayes.quantize_activations_`.)"""
    from .quant_conv import QuantConv2d

    quant = attach_input_quant(layer, ActQuant(spec, channel_axis=1 if isinstance(layer, (nn.Conv2d, QuantConv2d)) else -1))
    if not spec.dynamic:
        with torch.no_grad():
            layer(calib)
        quant.freeze()
    return layer


def attach_input_quant(layer: nn.Module, quant: ActQuant) -> ActQuant:
    """Make ``quant`` quantize ``layer``'s first input (child ``input_quant`` + a forward pre-hook);
    module surgery uses it to carry a quantizer over to the packed module replacing a layer."""
    layer.input_quant = quant
    layer._input_quant_hook = layer.register_forward_pre_hook(_pre_hook)
    return quant
