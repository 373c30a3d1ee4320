r"""Real integer execution on the CPU: :class:`Int8Linear` and :class:`Int8Conv2d`, and
:func:`to_int8_`, which swaps them in for packed layers with integer activation quantizers.

A layer ``QuantLinear``/``QuantConv2d`` with symmetric per-channel integer weights
(``Ŵ = s_w (q − 2^{b−1})``, ``b ≤ 8``) and an integer ``ActQuant`` in front of it (static
per-tensor, or dynamic per-tensor / per-token, ``x̂ = s_x (c − z_x)``, ``c = clamp(⌊x/s_x⌉ + z_x,
0, 2^b − 1)``) computes ``y = x̂ Ŵᵀ + b``. Here the same ``y`` is computed from the integer codes:

.. math::  y_{mn} = s_x\,s_w[n]\,\sum_k (c_{mk} − z_x)\,W_{q,nk} + b_n,\qquad W_q = q − 2^{b−1} \in \text{int8},

with the sum accumulated exactly in int32 (:mod:`qbayes.kernels.int8`), so the integer path
equals the fake-quant simulation to float rounding. The codes are the activation quantizer's
own (same scale, zero-point, rounding and SmoothQuant factor). These modules are inference-only
(no gradients) and CPU-only.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from ..errors import KernelError, QBayesError
from ..formats import unpack
from ..formats.int_affine import sym_zero
from ..kernels import int8 as k8
from ..kernels import int8_quantize as q8
from .act_quant import ActQuant
from .quant_conv import QuantConv2d
from .quant_linear import QuantLinear
from .surgery import set_module

MAX_K = 65_000  # 255 · 128 · K < 2^31: the int32 accumulator cannot overflow


def _int8_weight(ql: QuantLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_q int8 (N, K), s_w float32 (N,))`` from a packed layer, or a QBayesError saying why not."""
    spec = ql.spec
    if spec.format != "int":
        raise QBayesError(f"{name}: {spec.format} weights have no integer kernel; only 'int' codes run in int8")
    if ql.qzeros is not None or not spec.symmetric:
        raise QBayesError(f"{name}: asymmetric weights (stored zero-points) have no int8 kernel here; quantize "
                          "with QuantSpec(bits=8, group_size=-1, symmetric=True)")
    if ql.scales.shape[1] != 1:
        raise QBayesError(f"{name}: grouped weights ({spec.granularity}) need one scale per output channel for an "
                          "int8 GEMM; quantize with group_size=-1 (per-channel) or 0 (per-tensor)")
    if ql.in_features > MAX_K:
        raise QBayesError(f"{name}: {ql.in_features} inputs could overflow the int32 accumulator (max {MAX_K})")
    codes = unpack(ql.qweight, spec.bits, ql.in_features)
    w = (codes.to(torch.int16) - sym_zero(spec.bits)).to(torch.int8)
    return w, ql.scales[:, 0].float()


def _check_quant(quant, name: str, conv: bool) -> ActQuant:
    if not isinstance(quant, ActQuant):
        raise QBayesError(f"{name}: no input quantizer; run qbayes.quantize_activations_ first (weight-only "
                          "layers stay as they are)")
    spec = quant.spec
    if spec.format != "int":
        raise QBayesError(f"{name}: {spec.format} activations have no integer GEMM; use format='int'")
    if spec.granularity == "per-channel" or conv and spec.granularity != "per-tensor":
        allowed = "per-tensor" if conv else "per-tensor or per-token"
        raise QBayesError(f"{name}: {spec.granularity} activation ranges cannot be factored out of an int8 "
                          f"{'convolution' if conv else 'GEMM'}; use {allowed} ranges")
    if not quant.calibrated:
        raise QBayesError(f"{name}: the activation quantizer is not calibrated: run qbayes.quantize_activations_ "
                          "with calibration data (or call freeze()) before to_int8_")
    return quant


def _repack_after_load(module: nn.Module, _incompatible) -> None:
    """Prepacked weights are derived state: rebuild them when a state dict is loaded."""
    module._repack()


def _check_input(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cpu":
        raise KernelError(f"{name} runs on the CPU only; got an input on {x.device}")


class Int8Linear(nn.Module):
    """``y = s_x s_w (c − z_x) W_qᵀ + b`` with int8 operands and int32 accumulation.

    Buffers: ``weight`` int8 ``(out, in)``, ``w_scale`` float32 ``(out,)``, ``bias`` float32;
    the child ``input_quant`` is the layer's :class:`ActQuant`. ``backend``: ``"auto"`` (the
    fastest exact one here, see :func:`qbayes.kernels.int8.pick_backend`), ``"onednn"``,
    ``"fbgemm"``, ``"int_mm"`` or ``"reference"``.
    """

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_quant: ActQuant, backend: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.float().contiguous())
        self.input_quant = _check_quant(input_quant, "Int8Linear", conv=False)
        noise = input_quant.noise
        if noise is not None:  # NoisyQuant: the kernel quantizes x + N; −N Ŵᵀ joins the bias (exact up to rounding)
            shift = -(weight.double() * w_scale.double().view(-1, 1)) @ noise.double().cpu()
            bias = shift if bias is None else bias.double() + shift
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.backend = k8.pick_backend("linear", backend)
        self.register_load_state_dict_post_hook(_repack_after_load)
        self._repack()

    @classmethod
    def from_quant(cls, layer: QuantLinear, backend: str = "auto", name: str = "layer") -> "Int8Linear":
        """Build from a ``QuantLinear`` with an attached integer input quantizer (raises if unsupported)."""
        quant = _check_quant(getattr(layer, "input_quant", None), name, conv=False)
        w, s = _int8_weight(layer, name)
        return cls(w, s, layer.bias, quant, backend)

    def _repack(self) -> None:
        """Derived, non-state operands: column sums, ``W_qᵀ`` and the backend's prepacked weights."""
        self.register_buffer("colsum", k8.weight_colsum(self.weight), persistent=False)
        self._ones = torch.ones(self.out_features)  # unit weight scales: oneDNN returns the accumulators
        self._wt = self.weight.t().contiguous() if self.backend == "int_mm" else None
        self._packs = {}
        if self.backend == "onednn":
            self._packs["onednn"] = k8.onednn_linear_prepack(self.weight)
        elif self.backend == "fbgemm":
            self._packs["dynamic"] = k8.fbgemm_prepack(self.weight, self._ones)
            if not self.input_quant.spec.dynamic:  # s_x is fixed: fold it and the bias into the kernel
                sx = self.input_quant.scale.float()
                self._packs["static"] = k8.fbgemm_prepack(self.weight, sx * self.w_scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, "Int8Linear")
        quant, x = self.input_quant, x.detach()
        if self.backend == "fbgemm":
            x2 = q8.smoothed(quant, x).reshape(-1, self.in_features)
            y = self._fbgemm(x2, *quant.params(x2))
        elif self.backend == "onednn":
            codes, s, z = q8.input_codes(quant, x)
            if z.numel() == 1:  # one (s, z): s_x s_w A + b inside the kernel
                y = k8.onednn_linear(codes, float(s), int(z), self._packs["onednn"], self.w_scale, self.bias)
            else:  # per-row (s, z): the integer accumulators with one shared z₀, then one fused epilogue pass
                z0 = int(z.flatten().median())  # the closest shared z₀ keeps |A₀| small (exact in float32)
                acc = k8.onednn_linear(codes, 1.0, z0, self._packs["onednn"], self._ones, None)
                y = q8.row_epilogue(acc, s, z - z0, self.colsum, self.w_scale, self.bias)
        elif self.backend == "int_mm":
            codes, s, z = q8.input_codes(quant, x, shift=True)  # c − 128 as int8
            if k8.int_mm_shapes_ok(codes.shape[0], self.in_features, self.out_features):
                acc, z0 = torch._int_mm(codes, self._wt), 128
            else:
                acc, z0 = k8.int_mm_reference(codes, 0, self.weight), 128
            y = q8.row_epilogue(acc, s, z - z0, self.colsum, self.w_scale, self.bias)
        else:
            codes, s, z = q8.input_codes(quant, x)
            y = k8.dequantize_acc(k8.int_mm_reference(codes, z, self.weight), s, self.w_scale, self.bias)
        return y.to(x.dtype if x.is_floating_point() else torch.float32).view(*x.shape[:-1], self.out_features)

    def _fbgemm(self, x2: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        top = (1 << self.input_quant.spec.bits) - 1
        X = torch.div(x2, s).round_()  # ⌊x/s⌉ exactly as the quantizer rounds; fbgemm adds z and clamps to 0..255
        if not self.input_quant.spec.dynamic:
            zi = int(z)
            if top < 255:
                X.clamp_(-zi, top - zi)
            return k8.fbgemm_linear(X, zi, self._packs["static"])  # s_x s_w A + b inside the kernel
        # dynamic: feed X = ⌊x/s⌉ + z − z₀ with one z₀, so fbgemm's codes are c, then the per-row epilogue
        z0 = int(z.flatten().median())
        X.add_(z - z0)
        if top < 255:
            X.clamp_(-z0, top - z0)
        acc = k8.fbgemm_linear(X, z0, self._packs["dynamic"])  # unit weight scales: the accumulators
        return q8.row_epilogue(acc, s, z - z0, self.colsum, self.w_scale, self.bias)

    def forward_requantized(self, x: torch.Tensor, out_scale: float, out_zero: int, bits: int = 8,
                            signed: bool = False) -> torch.Tensor:
        """The next layer's codes ``q ≈ round(y / s_out) + z_out`` straight from the int32
        accumulators (integer fixed-point requantization, :func:`qbayes.kernels.int8.requantize`)."""
        _check_input(x, "Int8Linear")
        quant = self.input_quant
        codes, s, z = q8.input_codes(quant, x.detach())
        wt = self._wt if self._wt is not None else self.weight.t().contiguous()
        acc = k8.int_mm(codes, z, wt, self.colsum)
        acc_scale = s.double().reshape(-1, 1) * self.w_scale.double()
        m0, shift = k8.quantize_multiplier(acc_scale / float(out_scale))
        bq = None if self.bias is None else k8.bias_to_acc(self.bias, s.reshape(-1, 1), self.w_scale)
        q = k8.requantize(acc, m0, shift, out_zero, bits, signed, bq)
        return q.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


class Int8Conv2d(nn.Module):
    """A convolution on uint8 activation codes and int8 weights with int32 accumulation:
    ``y = s_x s_w[o] Σ (c − z_x) W_q + b`` (zero padding is code ``z_x``, i.e. ``x = 0``).

    Per-tensor activation ranges (static or dynamic). ``backend``: ``"auto"``, ``"onednn"``
    (oneDNN's int8 convolution) or ``"reference"``. Like torch's own int8 convolutions the output
    is channels-last (same values and shape; ``.flatten``/``.reshape`` work, ``.view(B, -1)``
    does not): converting it back to NCHW costs more than the convolution at typical sizes.
    ``channels_last_output=False`` returns contiguous NCHW instead.
    """

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_quant: ActQuant, stride=1, padding=0, dilation=1, groups: int = 1, backend: str = "auto",
                 channels_last_output: bool = True):
        super().__init__()
        self.channels_last_output = channels_last_output
        self.out_channels, cin_g, kh, kw = weight.shape
        self.in_channels, self.kernel_size, self.groups = cin_g * groups, (kh, kw), groups
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        if cin_g * kh * kw > MAX_K:
            raise QBayesError(f"Int8Conv2d: {cin_g * kh * kw} inputs per output could overflow int32 (max {MAX_K})")
        self.register_buffer("weight", weight.to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.input_quant = _check_quant(input_quant, "Int8Conv2d", conv=True)
        self.backend = k8.pick_backend("conv", backend)
        self.register_load_state_dict_post_hook(_repack_after_load)
        self._repack()

    @classmethod
    def from_quant(cls, layer: QuantConv2d, backend: str = "auto", name: str = "layer",
                   channels_last_output: bool = True) -> "Int8Conv2d":
        """Build from a ``QuantConv2d`` with an attached per-tensor integer input quantizer."""
        quant = _check_quant(getattr(layer, "input_quant", None), name, conv=True)
        w, s = _int8_weight(layer.packed, name)
        kh, kw = layer.kernel_size
        w = w.view(layer.out_channels, layer.in_channels // layer.groups, kh, kw)
        return cls(w, s, layer.packed.bias, quant, layer.stride, layer.padding, layer.dilation, layer.groups, backend,
                   channels_last_output)

    def _repack(self) -> None:
        self._pack, self._noise_maps = None, {}
        if self.backend == "onednn":
            q = self.input_quant
            sx, zx = (1.0, 0) if q.spec.dynamic else (float(q.scale), int(q.zero))
            self._pack = k8.onednn_conv_prepack(self.weight, self.w_scale, sx, zx, self.stride, self.padding,
                                                self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, "Int8Conv2d")
        quant = self.input_quant
        codes, s, z = q8.tensor_codes(quant, x.detach())  # the quantizer's c
        zi = int(z)
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        if self.backend == "onednn":  # oneDNN works channels-last; a uint8 reorder is the cheapest place for it
            codes = codes.contiguous(memory_format=torch.channels_last)
            y = k8.onednn_conv(codes, float(s), zi, self._pack, self.w_scale, self.bias, *geometry)
        else:
            acc = k8.conv_reference(codes, zi, self.weight, *geometry)
            y = acc.float() * (s.float() * self.w_scale).view(1, -1, 1, 1)
            if self.bias is not None:
                y += self.bias.view(1, -1, 1, 1)
        if quant.noise is not None:  # NoisyQuant: the codes are of x + N; remove N's response (padding included)
            y -= self._noise_response(codes.shape[-2:])
        y = y.contiguous(memory_format=torch.channels_last if self.channels_last_output else torch.contiguous_format)
        return y.to(x.dtype if x.is_floating_point() else torch.float32)

    def _noise_response(self, size) -> torch.Tensor:
        """``conv(N, Ŵ)`` for a constant image ``N`` of ``size``, zero-padded as the input is (cached)."""
        key = tuple(size)
        if key not in self._noise_maps:
            n = self.input_quant.noise.double().cpu().view(1, -1, 1, 1).expand(1, self.in_channels, *key)
            w = self.weight.double() * self.w_scale.double().view(-1, 1, 1, 1)
            self._noise_maps[key] = F.conv2d(n, w, None, self.stride, self.padding, self.dilation,
                                             self.groups).float()
        return self._noise_maps[key]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, backend={self.backend}")


def to_int8_(model: nn.Module, backend: str = "auto", conv_channels_last: bool = True) -> dict:
    """Swap, in place, every ``QuantLinear``/``QuantConv2d`` of ``model`` that has an integer input
    quantizer for :class:`Int8Linear`/:class:`Int8Conv2d`, and report what happened.

    Returns ``{"converted": {name: kind}, "left": {name: reason}, "backend": {"linear", "conv"}}``:
    every other linear/convolution layer (float weights, weight-only, grouped or asymmetric
    weights, log or per-channel activations, ...) keeps running as it did, with the reason. A
    ``backend`` other than ``"auto"`` applies to the linear layers; convolutions pick their own.
    ``conv_channels_last``: convolution outputs channels-last (fast, see :class:`Int8Conv2d`) or NCHW.
    """
    converted, left = {}, {}
    kinds = (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        if not isinstance(mod, kinds) or isinstance(parent, QuantConv2d):
            continue
        label = name or "<root>"
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            left[label] = "float weights: quantize them first (qbayes.quantize_ with convs=True)"
            continue
        if not name:
            left[label] = "the model itself is the layer: wrap it in a container to swap it"
            continue
        try:
            new = (Int8Linear.from_quant(mod, backend, label) if isinstance(mod, QuantLinear)
                   else Int8Conv2d.from_quant(mod, "auto", label, conv_channels_last))
        except QBayesError as e:
            left[label] = str(e)
            continue
        set_module(model, name, new)
        converted[label] = type(new).__name__
    return {"converted": converted, "left": left,
            "backend": {"linear": k8.pick_backend("linear", backend), "conv": k8.pick_backend("conv")}}
