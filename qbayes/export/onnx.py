"""Export a qbayes-quantized causal LM to ONNX for ONNX Runtime.

The model is traced with ``torch.onnx.export(dynamo=True)``; while exporting, every
:class:`~qbayes.nn.QuantLinear` calls the custom op ``qbayes::packed_linear``, translated to:

* 2- and 4-bit codes in power-of-two groups of at least 16: ``com.microsoft::MatMulNBits`` over
  the very same packed bytes (low-first packing, one scale per group, packed zero-points; the
  symmetric zero-point ``2^(bits-1)`` is MatMulNBits' default), so ONNX Runtime runs the packed
  weights with its own low-bit kernels;
* 8-bit codes: ``DequantizeLinear`` (opset 21, blocked along the input) and ``MatMul``;
* anything else (3-bit codes, groups MatMulNBits cannot express): the dequantized float weight
  and ``MatMul``; the report lists these conversions.

The graph takes ``input_ids`` ``(batch, sequence)`` and returns ``logits`` (no key/value cache).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import QBayesError
from ..kernels import dequantize_packed

log = logging.getLogger(__name__)


@torch.library.custom_op("qbayes::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                  bias: torch.Tensor | None, bits: int, group: int, in_features: int, out_features: int) -> torch.Tensor:
    w = dequantize_packed(qweight, scales, qzeros, bits, in_features, group, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@packed_linear.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group, in_features, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def kind_of(bits: int, group: int) -> str:
    """How a layout is exported: ``"MatMulNBits"``, ``"DequantizeLinear"`` or ``"float"``."""
    if bits in (2, 4) and group >= 16 and group & (group - 1) == 0:
        return "MatMulNBits"
    return "DequantizeLinear" if bits == 8 else "float"


def _translation():
    from onnxscript import opset18 as op
    from onnxscript import opset21 as op21
    from onnxscript.values import Op, Opset

    matmul_nbits = Op(Opset("com.microsoft", 1), "MatMulNBits", _matmulnbits_schema())

    def packed_linear_onnx(x, qweight, scales, qzeros, bias, bits: int, group: int, in_features: int,
                           out_features: int):
        scale32 = op.Cast(scales, to=1)  # float16 -> float32, exact
        if bits == 8:
            W = op21.DequantizeLinear(qweight, scale32, qzeros, axis=1, block_size=group)
            y = op.MatMul(x, op.Transpose(W, perm=[1, 0]))
        else:
            blocks = in_features // group
            B = op.Reshape(qweight, op.Constant(value_ints=[out_features, blocks, group * bits // 8]))
            if qzeros is None:
                y = matmul_nbits(x, B, scale32, K=in_features, N=out_features, bits=bits, block_size=group)
            else:
                zp = op.Reshape(qzeros, op.Constant(value_ints=[-1]))
                y = matmul_nbits(x, B, scale32, zp, K=in_features, N=out_features, bits=bits, block_size=group)
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=1))
        return y

    return packed_linear_onnx


def _matmulnbits_schema():
    """ONNX Runtime's contrib op ``com.microsoft::MatMulNBits`` (ONNX itself ships no schema for it)."""
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    ints = [OpSchema.Attribute(n, OpSchema.AttrType.INT, n) for n in ("K", "N", "bits", "block_size")]
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "")],
        attributes=ints)


def export_onnx(model: nn.Module, path: str | Path, *, seq_len: int = 8, opset: int = 21) -> dict:
    """Write ``model`` (from :func:`qbayes.quantize_` or :func:`qbayes.load_quantized`) to ``path``,
    an ``.onnx`` file; returns a report of how each quantized layer was exported."""
    report, prepared = prepare_layers(model)
    ids = torch.zeros(2, seq_len, dtype=torch.long)  # not 1: torch.export would fix a size-1 batch
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_program(out, lambda: torch.onnx.export(
            model, (ids,), dynamo=True, input_names=["input_ids"], output_names=["logits"], opset_version=opset,
            kwargs={"use_cache": False}, optimize=True,
            dynamic_shapes={"input_ids": {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("seq", min=2, max=8192)},
                            "use_cache": None},
            custom_translation_table={torch.ops.qbayes.packed_linear.default: _translation()}))
    finally:
        restore_layers(prepared)
    return report


def save_program(out: Path, export) -> None:
    """Run ``export()`` (a ``torch.onnx`` program) and save it to ``out`` through a temporary file,
    so a failed export never leaves a partial model (or destroys an existing one)."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        export().save(str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_layers(model: nn.Module) -> tuple[dict, list]:
    """Mark every QuantLinear for export (its forward then calls ``qbayes::packed_linear``); the
    report says how each layout is exported. Undo with :func:`restore_layers`."""
    from ..nn import QuantLinear

    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise QBayesError("ONNX export needs the 'onnx' and 'onnxscript' packages: pip install onnx onnxscript") from e
    report: dict = {"MatMulNBits": 0, "DequantizeLinear": 0, "float": []}
    prepared = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            kind = kind_of(m.spec.bits, m.group_cols) if m.spec.fmt.affine else "float"
            m._export = {"kind": kind}
            m.forward_override = export_forward
            if kind == "float":
                report["float"].append(f"{name} ({m.spec}, group {m.group_cols})")
                m._export["weight"] = m.dequantize(torch.float32)
            else:
                report[kind] += 1
                if kind == "DequantizeLinear":  # unpacked uint8 zero-points (128 when symmetric)
                    zp = m.qzeros if m.qzeros is not None else torch.full_like(m.scales, 128, dtype=torch.uint8)
                    m._export["zeros"] = zp.contiguous()
            prepared.append(m)
    if not prepared:
        raise QBayesError("the model has no QuantLinear layers: quantize it with qbayes first")
    if report["float"]:
        log.warning("exported as float weights (no ONNX Runtime low-bit operator for them): %s", ", ".join(report["float"]))
    return report, prepared


def restore_layers(prepared: list) -> None:
    for m in prepared:
        m.__dict__.pop("_export", None)
        m.__dict__.pop("forward_override", None)


def export_forward(m, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear's forward while :func:`export_onnx` traces it."""
    e = m._export
    if e["kind"] == "float":
        return torch.nn.functional.linear(x, e["weight"].to(x.dtype), None if m.bias is None else m.bias.to(x.dtype))
    qz = e.get("zeros", m.qzeros)
    return torch.ops.qbayes.packed_linear(x, m.qweight, m.scales, qz, m.bias, m.spec.bits, m.group_cols,
                                          m.in_features, m.out_features)
