"""`QuantLinear`: a linear layer whose weight is stored as packed low-bit codes.

Storage (all buffers, so ``state_dict`` is the checkpoint):

* ``qweight``: uint8 ``(out, packed_length(in, bits))``: codes, bit-packed along the input;
* ``scales``: float16 (or the spec's scale dtype) ``(out, n_groups)``;
* ``qzeros``: uint8 ``(out, packed_length(n_groups, bits))`` where the format stores zero-points
  (asymmetric integer codes);
* ``bias``: 16-bit float ``(out,)`` if the layer has one.

Per-tensor quantization is expanded to per-channel storage (identical values). The spec's
number format decides what runs: integer affine layouts use the packed CPU / Triton kernels where
they support them; every other format (and layout) dequantizes through the format's own
reference decoder.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import PER_CHANNEL, PER_TENSOR, QuantizedWeight, pack, packed_length
from ..kernels import cpu as cpu_kernel
from ..kernels import linear
from ..spec import QuantSpec
from ..errors import QBayesError

# rows of activations up to which the packed CPU kernel beats dequantized tiles x GEMM (bench/kernels_cpu.py)
CPU_KERNEL_MAX_ROWS = 8
# rows up to which the fused Triton kernel is used on a GPU; more rows: Triton dequantize + cuBLAS
GPU_KERNEL_MAX_ROWS = 16


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__()
        spec.check_layer(in_features, "QuantLinear")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        g = self.group_cols
        n_groups = in_features // g
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(out_features, packed_length(in_features, spec.bits), dtype=torch.uint8, **kw))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=spec.torch_scale_dtype, **kw))
        if not spec.fmt.stores_zero(spec.symmetric):
            self.qzeros = None
        else:
            self.register_buffer("qzeros", torch.zeros(out_features, packed_length(n_groups, spec.bits), dtype=torch.uint8, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, **kw))
        else:
            self.bias = None

    @property
    def group_cols(self) -> int:
        g = self.spec.group_size
        return self.in_features if g in (PER_CHANNEL, PER_TENSOR) else g

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, spec: QuantSpec, bias: torch.Tensor | None = None,
                       bias_dtype: torch.dtype = torch.float16) -> "QuantLinear":
        out, inp = qw.codes.shape
        m = cls(inp, out, spec, bias=bias is not None, bias_dtype=bias_dtype, device=qw.codes.device)
        return m.fill(qw, bias)

    def fill(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        """Pack a solver's result ``qw`` (codes of shape ``(out, in)``) into this module's buffers."""
        spec, out = self.spec, qw.codes.shape[0]
        scale, zero = qw.scale, qw.zero
        if spec.group_size == PER_TENSOR:
            scale, zero = scale.expand(out, 1), zero.expand(out, 1)
        stored = scale.to(spec.torch_scale_dtype)
        if not torch.equal(stored.to(scale.dtype), scale):
            raise QBayesError("scales are not representable in the storage dtype; use qbayes.ranges to choose them")
        self.qweight.copy_(pack(qw.codes, spec.bits))
        self.scales.copy_(stored)
        if self.qzeros is not None:
            self.qzeros.copy_(pack(zero.round().to(torch.int64), spec.bits))
        if bias is not None:
            self.bias.copy_(bias.detach().to(self.bias.dtype))
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if (self.qweight.device.type == "cpu" and dtype == torch.float32 and self.spec.fmt.affine
                and cpu_kernel.supports(self.spec.bits, self.in_features, self.group_cols, self.scales.dtype)
                and cpu_kernel.available()):
            return cpu_kernel.dequant(self.qweight, self.scales, self.qzeros, self.spec.bits, self.in_features,
                                      self.group_cols)
        return self.spec.fmt.dequantize_packed(self.qweight, self.scales, self.qzeros, self.spec.bits,
                                               self.in_features, self.group_cols, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        override = self.__dict__.get("forward_override")
        if override is not None:  # an exporter tracing the model (qbayes.export) computes the layer its way
            return override(self, x)
        if x.is_cuda and self._fast_cuda(x):
            from ..kernels import triton_kernels as tk

            x2 = x.reshape(-1, self.in_features)
            if x2.shape[0] <= GPU_KERNEL_MAX_ROWS:
                y = tk.qlinear(x2, self.qweight, self.scales, self.qzeros, self.bias, self.spec.bits,
                               self.in_features, self.group_cols)
            else:
                w = tk.dequant(self.qweight, self.scales, self.qzeros, self.spec.bits, self.in_features,
                               self.group_cols, x.dtype)
                y = linear(x2, w, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if self._fast_cpu(x):
            # 16-bit activations run the float32 kernels too (converted in and out: a row of
            # activations is tiny next to the weight), one rounding of the float32 result
            x2 = x.reshape(-1, self.in_features).float()
            if x2.shape[0] <= CPU_KERNEL_MAX_ROWS:  # the bias is added inside the kernel
                y = cpu_kernel.qgemm(x2, self.qweight, self.scales, self.qzeros, self.spec.bits, self.group_cols,
                                     self.bias)
            else:
                y = cpu_kernel.qgemm_tiled(x2, self.qweight, self.scales, self.qzeros, self.spec.bits,
                                           self.group_cols)
                if self.bias is not None:
                    y += self.bias
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return linear(x, self.dequantize(x.dtype if x.is_floating_point() else torch.float32), self.bias)

    def _fast_cpu(self, x: torch.Tensor) -> bool:
        """Float32 (or 16-bit float) on the CPU, no autograd, a layout the packed kernels support: few rows go to
        the packed GEMV/GEMM kernel (decoding is bound by the weight bytes it reads), many rows
        to dequantized tiles times the BLAS GEMM; everything else to the reference path."""
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.device.type != "cpu":
            return False
        if x.requires_grad and torch.is_grad_enabled():
            return False
        ok = self.__dict__.get("_kernel_ok")
        if ok is None:  # the layout never changes: decide once
            ok = self._kernel_ok = (self.spec.fmt.affine and cpu_kernel.supports(
                self.spec.bits, self.in_features, self.group_cols, self.scales.dtype) and cpu_kernel.available())
        return ok

    def _fast_cuda(self, x: torch.Tensor) -> bool:
        """Floating activations on a CUDA device, no autograd, Triton importable: the Triton kernels."""
        if not x.is_floating_point() or (x.requires_grad and torch.is_grad_enabled()):
            return False
        ok = self.__dict__.get("_triton_ok")
        if ok is None:
            from ..kernels import triton_kernels as tk

            ok = self._triton_ok = self.spec.fmt.affine and tk.available() and self.qweight.is_contiguous()
        return ok

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}"
