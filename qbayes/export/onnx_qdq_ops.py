r"""The custom ops that :mod:`qbayes.export.onnx_qdq` traces, and their ONNX translations.

While a model is exported, each quantized piece calls one op of the ``qbayes`` namespace, opaque
to ``torch.export`` and translated to standard ONNX (opset 21):

* ``qbayes::act_qdq``: a static activation quantizer, ``QuantizeLinear`` → ``DequantizeLinear``
  with its scale and zero-point (``uint8`` for asymmetric codes, ``int8`` with zero-point 0 for
  symmetric ones); codes narrower than 8 bits keep the 8-bit container and a ``Clip`` to their
  range between the two;
* ``qbayes::qdq_matmul``: a :class:`~qbayes.nn.QuantLinear`: its codes as a ``(in, out)``
  initializer, ``DequantizeLinear`` per output column (``axis=1``; blocked along the input when
  the layer has groups), ``MatMul``, and the float bias;
* ``qbayes::qdq_conv``: a :class:`~qbayes.nn.QuantConv2d`: its ``(out, in/groups, kh, kw)`` codes,
  ``DequantizeLinear`` per output channel (``axis=0``), ``Conv``.

Weight codes are stored signed: a ``b``-bit code ``c`` with zero-point ``z`` becomes
``c − 2^(b−1)`` with zero-point ``z − 2^(b−1)``, so ``(c − z)`` and the dequantized weight are
unchanged and every width fits ``int8`` (the type ONNX Runtime's QDQ fusion takes for weights).
4-bit codes travel as ``Cast(to=INT4)`` of the ``int8`` tensor, which :func:`fold_int4_casts`
then folds into packed ``int4`` initializers.

The eager implementations compute exactly what qbayes's fake-quantization does, so the traced
program (and any shape inference on it) is the model's own function. :func:`prepare_qdq` points
each quantizer and packed layer of a model at these ops for the duration of an export, and
:class:`Flat` is the model as traced (positional tensors in, a tuple of tensors out).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import QBayesError
from ..formats import unpack

INT4, UINT4, INT8, UINT8 = 22, 21, 3, 2  # onnx.TensorProto codes
# qbayes packages whose modules are plain float torch code (traced as they are)
PLAIN_PACKAGES = ("qbayes.models.", "qbayes.transforms.")


def along_axis(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A per-axis (1-D) parameter shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    if t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = t.numel()
    return t.view(shape)


@torch.library.custom_op("qbayes::act_qdq", mutates_args=())
def act_qdq(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: int, qmin: int, qmax: int,
            onnx_type: int) -> torch.Tensor:
    s, z = along_axis(scale, axis, x.dim()), along_axis(zero.float(), axis, x.dim())
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


@act_qdq.register_fake
def _(x, scale, zero, axis, qmin, qmax, onnx_type):
    return torch.empty_like(x)


def weight_matrix(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, block: int) -> torch.Tensor:
    """The float ``(in, out)`` matrix of ``qdq_matmul``'s operands (``block`` 0: per column)."""
    c, z = codes.float(), zero.float()
    if block:
        z, scale = z.repeat_interleave(block, 0), scale.repeat_interleave(block, 0)
    return (c - z) * scale


@torch.library.custom_op("qbayes::qdq_matmul", mutates_args=())
def qdq_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bias: torch.Tensor | None, block: int, int4: bool) -> torch.Tensor:
    y = x @ weight_matrix(codes, scale, zero, block).to(x.dtype)
    return y if bias is None else y + bias


@qdq_matmul.register_fake
def _(x, codes, scale, zero, bias, block, int4):
    return x.new_empty(*x.shape[:-1], codes.shape[1])


@torch.library.custom_op("qbayes::qdq_conv", mutates_args=())
def qdq_conv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             bias: torch.Tensor | None, kernel: list[int], stride: list[int], padding: list[int],
             dilation: list[int], groups: int, block: int, int4: bool) -> torch.Tensor:
    return F.conv2d(x, conv_weight(codes, scale, zero, kernel, block), bias, stride, padding, dilation, groups)


def conv_weight(codes, scale, zero, kernel, block) -> torch.Tensor:
    """The float ``(out, in/groups, kh, kw)`` kernel of ``qdq_conv``'s operands."""
    if block:  # codes (out, in/groups*kh*kw), blocked along the flattened input
        w = weight_matrix(codes.t(), scale.t(), zero.t(), block).t()
        return w.reshape(codes.shape[0], -1, *kernel)
    return (codes.float() - along_axis(zero.float(), 0, 4)) * along_axis(scale, 0, 4)


@qdq_conv.register_fake
def _(x, codes, scale, zero, bias, kernel, stride, padding, dilation, groups, block, int4):
    hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]
    return x.new_empty(x.shape[0], codes.shape[0], *hw)


def translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the ONNX of each op above."""
    from onnxscript import opset21 as op

    def maybe_int4(t, int4: bool):
        return op.Cast(t, to=INT4) if int4 else t

    def act_qdq_onnx(x, scale, zero, axis: int, qmin: int, qmax: int, onnx_type: int):
        q = op.QuantizeLinear(x, scale, zero, axis=axis)
        full = {UINT8: (0, 255), INT8: (-128, 127)}.get(onnx_type)
        if full is not None and (qmin, qmax) != full:  # fewer bits than the container holds
            q = op.Clip(q, op.CastLike(op.Constant(value_int=qmin), zero), op.CastLike(op.Constant(value_int=qmax), zero))
        return op.DequantizeLinear(q, scale, zero, axis=axis)

    def qdq_matmul_onnx(x, codes, scale, zero, bias, block: int, int4: bool):
        codes, zero = maybe_int4(codes, int4), maybe_int4(zero, int4)
        if block:
            w = op.DequantizeLinear(codes, scale, zero, axis=0, block_size=block)
        else:
            w = op.DequantizeLinear(codes, scale, zero, axis=1)
        y = op.MatMul(x, w)
        return y if bias is None else op.Add(y, bias)

    def qdq_conv_onnx(x, codes, scale, zero, bias, kernel: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], groups: int, block: int, int4: bool):
        codes, zero = maybe_int4(codes, int4), maybe_int4(zero, int4)
        if block:
            w = op.DequantizeLinear(codes, scale, zero, axis=1, block_size=block)
            w = op.Reshape(w, op.Constant(value_ints=[0, -1, *kernel]))
        else:
            w = op.DequantizeLinear(codes, scale, zero, axis=0)
        pads = [*padding, *padding]
        if bias is None:
            return op.Conv(x, w, strides=stride, pads=pads, dilations=dilation, group=groups)
        return op.Conv(x, w, bias, strides=stride, pads=pads, dilations=dilation, group=groups)

    ops = torch.ops.qbayes
    return {ops.act_qdq.default: act_qdq_onnx, ops.qdq_matmul.default: qdq_matmul_onnx,
            ops.qdq_conv.default: qdq_conv_onnx}


def fold_int4_casts(model) -> int:
    """Replace every ``Cast(to=INT4/UINT4)`` of an initializer in ``model`` (an ``onnx.ModelProto``)
    by the packed 4-bit initializer; returns how many were folded. ``torch.onnx``'s optimizer
    folds only small constants, and a 4-bit weight kept as ``int8`` + ``Cast`` is twice as large."""
    import ml_dtypes
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    folded, keep = 0, []
    for n in graph.node:
        to = next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
        if to in (INT4, UINT4) and n.input[0] in inits:
            arr = numpy_helper.to_array(inits[n.input[0]])
            dtype = ml_dtypes.int4 if to == INT4 else ml_dtypes.uint4
            graph.initializer.append(numpy_helper.from_array(arr.astype(dtype), n.output[0]))
            uses[n.input[0]] -= 1
            folded += 1
        else:
            keep.append(n)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        unused = [t for t in graph.initializer if uses.get(t.name, 1) == 0]
        for t in unused:
            graph.initializer.remove(t)
    return folded


class Flat(nn.Module):
    """The model with positional tensor inputs and a tuple of tensor outputs (what ONNX names)."""

    def __init__(self, model: nn.Module, keys: list[str] | None):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *args):
        return tuple(_flatten(self.model(**dict(zip(self.keys, args))) if self.keys else self.model(*args))[0])

    def run(self, args) -> tuple[list[torch.Tensor], list[str] | None]:
        return _flatten(self.model(**dict(zip(self.keys, args))) if self.keys else self.model(*args))


def _flatten(out) -> tuple[list[torch.Tensor], list[str] | None]:
    """The tensors of a model's output and, for a dict-like output (a transformers ``ModelOutput``), their keys."""
    if isinstance(out, torch.Tensor):
        return [out], None
    if hasattr(out, "keys"):
        pairs = [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
        return [v for _, v in pairs], [k for k, _ in pairs]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)[0]], None
    raise QBayesError(f"cannot export a model output of type {type(out).__name__}: return tensors")


def model_inputs(example) -> tuple[list[str] | None, list[torch.Tensor]]:
    """``(keyword names or None, tensors)`` of example inputs given as a tensor, a tuple or a dict."""
    if isinstance(example, torch.Tensor):
        return None, [example]
    if hasattr(example, "keys"):
        return list(example.keys()), [example[k] for k in example.keys()]
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        return None, list(example)
    raise QBayesError("example inputs are a tensor, a tuple of tensors or a dict of tensors, not "
                      f"{type(example).__name__}")


def prepare_qdq(model: nn.Module, int4: bool = True) -> tuple[dict, list]:
    """Make every quantizer and packed layer of ``model`` call the ops of :mod:`.onnx_qdq_ops`
    (raises :class:`QBayesError` on a module the export cannot express); returns the report and
    what :func:`restore_qdq` undoes."""
    from ..nn import QuantConv2d, QuantLinear
    from ..nn.act_quant import ActQuant

    report = {"activations": {"qdq": [], "float": {}}, "weights": {"int8": [], "int4": [], "float": {}},
              "float_layers": []}
    undo: list = []
    inner = {id(m.packed) for m in model.modules() if isinstance(m, QuantConv2d)}
    n_quantized = 0
    try:
        for name, m in model.named_modules():
            name = name or "<model>"
            cls = type(m)
            if isinstance(m, ActQuant):
                n_quantized += 1
                why = _activation(name, m, undo)
                if why:
                    report["activations"]["float"][name] = why
                else:
                    report["activations"]["qdq"].append(name)
            elif isinstance(m, (QuantLinear, QuantConv2d)) and id(m) not in inner:
                n_quantized += 1
                kind = _weights(m, int4, undo)
                if kind in ("int8", "int4"):
                    report["weights"][kind].append(name)
                else:
                    report["weights"]["float"][name] = kind
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                report["float_layers"].append(name)
            elif cls.__module__.startswith("qbayes.") and not isinstance(m, (QuantLinear, QuantConv2d)) \
                    and not cls.__module__.startswith(PLAIN_PACKAGES):
                raise QBayesError(f"{name}: {cls.__name__} ({cls.__module__}) has no QDQ ONNX export; the export "
                                  "takes activation quantizers, QuantLinear, QuantConv2d and float torch layers "
                                  "(export a deterministic model, or replace this module first)")
        if not n_quantized:
            raise QBayesError("the model has no activation quantizers or packed layers: quantize it with "
                              "qbayes.quantize_activations_ and/or qbayes.quantize_ first")
    except BaseException:
        restore_qdq(undo)
        raise
    return report, undo


def restore_qdq(undo: list) -> None:
    for m, attr in undo:
        m.__dict__.pop(attr, None)


def _override(m: nn.Module, attr: str, fn, undo: list) -> None:
    if attr in m.__dict__:
        raise QBayesError(f"{type(m).__name__} already has an instance attribute {attr!r}: is an export running?")
    m.__dict__[attr] = fn
    undo.append((m, attr))


def _activation(name: str, q, undo: list) -> str | None:
    """Route one ActQuant's forward through ``qbayes::act_qdq``, or through float ops (returning why)."""
    spec = q.spec
    if not q.calibrated:
        raise QBayesError(f"{name}: the activation quantizer is not calibrated (it still observes): run "
                          "qbayes.quantize_activations_ with calibration batches before exporting")
    if spec.format != "int" or spec.dynamic:
        _override(q, "forward", lambda x: float_fake_quant(q, x), undo)
        if spec.format != "int":
            return f"{spec.format} codes (no ONNX quantized type): float ops computing qbayes's fake-quantization"
        return (f"dynamic {spec.granularity} ranges (ONNX QuantizeLinear takes constant scales): float ops "
                "computing each input's range and qbayes's fake-quantization")
    bits, signed = spec.bits, spec.symmetric
    off = 1 << (bits - 1) if signed else 0
    qmin, qmax = -off, (1 << bits) - 1 - off
    # codes narrower than 8 bits keep the 8-bit container and are clipped between Q and DQ. With int4
    # types, ONNX Runtime 1.32's optimizer removed the ReLU in front of a symmetric int4 QuantizeLinear
    # (zero-point 0, not the int4 minimum) and moved a small MLP's outputs by 80% of their range
    onnx_type = INT8 if signed else UINT8
    scale = q.scale.float()
    zero = (q.zero.float().round() - off).to(torch.int8 if signed else torch.uint8)

    def forward(x):
        y = torch.ops.qbayes.act_qdq(smoothed(q, x), scale, zero, q.channel_axis % x.dim(), qmin, qmax, onnx_type)
        return denoised(q, y)

    _override(q, "forward", forward, undo)
    return None


def smoothed(q, x: torch.Tensor) -> torch.Tensor:
    """What the quantizer rounds: ``x`` times its SmoothQuant ``1/s`` per channel, plus its
    NoisyQuant ``noise``, where it has them (as ActQuant applies them)."""
    smooth, noise = getattr(q, "smooth", None), getattr(q, "noise", None)
    axis = q.channel_axis % x.dim()
    if smooth is not None:
        x = x * along_axis(smooth, axis, x.dim()).to(x.dtype)
    return x if noise is None else x + along_axis(noise, axis, x.dim()).to(x.dtype)


def denoised(q, y: torch.Tensor) -> torch.Tensor:
    """``y`` minus the quantizer's NoisyQuant ``noise`` (float ops after the DequantizeLinear)."""
    noise = getattr(q, "noise", None)
    return y if noise is None else y - along_axis(noise, q.channel_axis % y.dim(), y.dim()).to(y.dtype)


def float_fake_quant(q, x: torch.Tensor) -> torch.Tensor:
    """ActQuant's fake-quantization for what has no ONNX quantized form (dynamic ranges, log codes),
    written with every reduction over explicit dimensions: ``torch.onnx`` cannot translate a
    whole-tensor ``amin()``/``amax()``."""
    from ..formats import fake_quantize, params_from_range
    from ..formats.log2 import log_fake_quantize

    spec, xf = q.spec, smoothed(q, x).float()
    axis = q.channel_axis % xf.dim()
    dims = ([xf.dim() - 1] if spec.granularity == "per-token" else
            [d for d in range(xf.dim()) if d != axis] if spec.granularity == "per-channel" else list(range(xf.dim())))
    if spec.format != "int":
        s = xf.amax(dims, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) if spec.dynamic else q.scale
        return log_fake_quantize(xf, s, spec.bits, spec.format).to(x.dtype)
    s, z = params_from_range(xf.amin(dims, keepdim=True), xf.amax(dims, keepdim=True), spec.bits, spec.symmetric, None)
    return denoised(q, fake_quantize(xf, s, z, spec.bits)).to(x.dtype)


def _weights(m, int4: bool, undo: list) -> str:
    """Route a QuantLinear's / QuantConv2d's forward through ``qdq_matmul`` / ``qdq_conv``;
    returns ``"int8"``/``"int4"``, or why the weight is exported as float."""
    from ..nn import QuantConv2d

    conv = isinstance(m, QuantConv2d)
    lin = m.packed if conv else m
    spec = lin.spec
    bias = None if lin.bias is None else lin.bias.float()
    if not (spec.fmt.affine and spec.bits <= 8):
        w = m.dequantize(torch.float32)
        if conv:
            _override(m, "forward", lambda x: F.conv2d(x, w.to(x.dtype), bias, m.stride, m.padding, m.dilation,
                                                       m.groups), undo)
        else:
            _override(m, "forward_override", lambda _, x: F.linear(x, w.to(x.dtype), bias), undo)
        return f"{spec} weights have no integer-affine codes: dequantized float weight"
    codes, scale, zero, block = signed_codes(lin)
    small = int4 and spec.bits <= 4
    if conv:
        kernel = list(m.kernel_size)
        if not block:
            codes, scale, zero = codes.view(m.out_channels, -1, *kernel), scale[:, 0], zero[:, 0]
        geo = [_pair(m.stride), _pair(m.padding), _pair(m.dilation)]
        _override(m, "forward", lambda x: torch.ops.qbayes.qdq_conv(x, codes, scale, zero, bias, kernel, *geo,
                                                                    m.groups, block, small), undo)
    else:
        codes = codes.t().contiguous()
        scale, zero = (scale.t().contiguous(), zero.t().contiguous()) if block else (scale[:, 0], zero[:, 0])
        _override(m, "forward_override", lambda _, x: torch.ops.qbayes.qdq_matmul(x, codes, scale, zero, bias, block,
                                                                                 small), undo)
    return "int4" if small else "int8"


def signed_codes(lin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A QuantLinear's ``(out, in)`` codes, its ``(out, groups)`` float32 scales and zero-points,
    codes and zero-points as int8 shifted by ``2^(b−1)`` (so ``c − z`` is unchanged), and the
    group width (0 when there is one group per row)."""
    spec = lin.spec
    bits, groups = spec.bits, lin.scales.shape[1]
    off = 1 << (bits - 1)
    codes = unpack(lin.qweight, bits, lin.in_features).to(torch.int16) - off
    if lin.qzeros is None:
        zero = torch.full((lin.out_features, groups), spec.fmt.default_zero(bits), dtype=torch.int16)
    else:
        zero = unpack(lin.qzeros, bits, groups).to(torch.int16)
    return codes.to(torch.int8), lin.scales.float(), (zero - off).to(torch.int8), 0 if groups == 1 else lin.group_cols


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]
