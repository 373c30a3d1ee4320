r"""QDQ ONNX export of activation-quantized models (CNNs, vision transformers, sentence encoders).

:func:`export_qdq` writes the model as ONNX Runtime's quantization tools would: every static
integer activation quantizer (:class:`~qbayes.nn.act_quant.ActQuant`, per tensor or per channel)
becomes ``QuantizeLinear`` → ``DequantizeLinear`` with its own scale and zero-point on the
layer's input, and the packed weights of :class:`~qbayes.nn.QuantLinear` /
:class:`~qbayes.nn.QuantConv2d` become signed integer initializers (``int8``, or packed ``int4``
for codes of at most 4 bits) with a per-output-channel ``DequantizeLinear`` feeding ``MatMul`` /
``Conv`` (see :mod:`.onnx_qdq_ops`). That is the pattern ONNX Runtime's QDQ fusion rewrites into
integer kernels; biases stay float.

Why the exported function is qbayes's: ONNX's ``QuantizeLinear`` is ``saturate(round(x / s) + z)``
with round-half-to-even, and ONNX Runtime's CPU kernel divides by the scale (it does not multiply
by a reciprocal: at ``s = 0.0123`` that would change 61 of 200,000 codes); qbayes computes
``clamp(torch.round(x / s) + z, 0, 2^b − 1)`` with the same float32 division and the same tie
rule. So on the same input every code is the same (:func:`compare_codes` counts the exceptions;
there are none; a network whose float arithmetic is exact runs bit-identically). The outputs of a
real model still differ by more than float rounding: an input within float rounding of a tie
rounds the other way in one of the two runs, after which later inputs differ by a code step and
more codes follow (:func:`check_qdq`); and ONNX Runtime's default optimizer quantizes float
weights and biases next to QDQ inputs, which :func:`ort_session`'s ``"faithful"`` mode avoids.

What is not exported as integers, and why (each one is listed in the report):

* dynamic quantizers (per token, per tensor or per channel): ONNX's ``QuantizeLinear`` takes a
  constant layout of scales and ``DynamicQuantizeLinear`` only one asymmetric uint8 range per
  tensor, so the range computation and the fake-quantization are exported as float ops (qbayes's
  formulas, :func:`~.onnx_qdq_ops.float_fake_quant`) — the same function, run in float;
* log2 / log√2 quantizers: ONNX has no logarithmic quantized type; exported the same way;
* weights in formats without integer-affine codes (NF4, …): the dequantized float weight.
"""
from __future__ import annotations

import itertools
import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import QBayesError
from .onnx_qdq_ops import (Flat, along_axis, fold_int4_casts, model_inputs, prepare_qdq, restore_qdq, smoothed,
                           translations)

log = logging.getLogger(__name__)


def export_qdq(model: nn.Module, example_inputs, path: str | Path, *, input_names: list[str] | None = None,
               output_names: list[str] | None = None, dynamic_axes: dict | None = None, opset: int = 21,
               int4: bool = True) -> dict:
    """Write ``model`` (activation-quantized by :func:`qbayes.quantize_activations_`, weights
    packed by :func:`qbayes.quantize_`, or either alone) to ``path`` as a QDQ ONNX model.

    Args:
        example_inputs: a tensor, a tuple of tensors (positional arguments) or a dict of tensors
            (keyword arguments, e.g. a tokenizer's ``input_ids``/``attention_mask``); a batch of
            at least 2 so the batch dimension can stay dynamic.
        input_names, output_names: ONNX names (default: the dict's keys or ``input``/``input<i>``;
            a model output's keys, e.g. ``last_hidden_state``, or ``output``/``output<i>``).
        dynamic_axes: ``{input name: {axis: name}}``; default: dimension 0 of every input is
            ``batch`` when the example batch has at least 2 rows; ``{}`` for fixed shapes.
        int4: store codes of at most 4 bits as packed ``int4`` (opset 21) instead of ``int8``.

    Returns a report: ``activations`` (``qdq``: names exported as QuantizeLinear/DequantizeLinear,
    ``float``: ``{name: why}``), ``weights`` (``int8``/``int4``: names, ``float``: ``{name: why}``),
    ``float_layers`` (Linear/Conv2d layers with float weights), ``ops`` (counts of node types in
    the file), ``bytes``, ``inputs``, ``outputs``.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise QBayesError("ONNX export needs the 'onnx' and 'onnxscript' packages: pip install onnx onnxscript") from e
    if opset < 21:
        raise QBayesError(f"QDQ export needs opset 21 or later (blocked and 4-bit DequantizeLinear), not {opset}")
    keys, args = model_inputs(example_inputs)
    names = list(input_names) if input_names else keys or (["input"] if len(args) == 1 else
                                                          [f"input{i}" for i in range(len(args))])
    if len(names) != len(args):
        raise QBayesError(f"{len(names)} input names for {len(args)} inputs")
    report, undo = prepare_qdq(model, int4)
    was_training = model.training
    model.eval()  # an export is for inference: batch norm uses its running statistics
    try:
        flat = Flat(model, keys)
        with torch.no_grad():
            outs, out_keys = flat.run(args)
        outputs = list(output_names) if output_names else out_keys or (
            ["output"] if len(outs) == 1 else [f"output{i}" for i in range(len(outs))])
        if dynamic_axes is None:
            batch = {a.shape[0] for a in args if a.dim() > 0}
            dynamic_axes = {n: {0: "batch"} for n in names} if len(batch) == 1 and min(batch) >= 2 else {}
        try:
            wanted = _dynamic_axes(names, args, dynamic_axes)
            exported = _capture(flat, tuple(args), wanted)
            program = torch.onnx.export(exported, tuple(args), dynamo=True, input_names=names, output_names=outputs,
                                        opset_version=opset, optimize=True, custom_translation_table=translations(),
                                        verbose=False)
        except QBayesError:
            raise
        except Exception as e:  # torch.export / onnxscript raise many kinds; name the model, keep the cause
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0] if str(e) else ""
            raise QBayesError(f"torch.onnx could not export {type(model).__name__}: {type(e).__name__}: {first}") from e
    finally:
        restore_qdq(undo)
        model.train(was_training)
    proto = program.model_proto
    fold_int4_casts(proto)
    _name_dims(proto, wanted)
    for n in proto.graph.node:  # the exporting machine's source paths: not needed to run, and large
        keep = [p for p in n.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)
    out = Path(path)
    _save(proto, out)
    report["ops"] = dict(Counter(n.op_type for n in proto.graph.node))
    report.update(bytes=out.stat().st_size, inputs=names, outputs=outputs)
    for name, why in {**report["activations"]["float"], **report["weights"]["float"]}.items():
        log.info("exported as float: %s (%s)", name, why)
    return report


def _save(proto, out: Path) -> None:
    """Write ``proto`` through a temporary file, so a failed write never leaves a partial model
    (or destroys an existing one)."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        onnx.save(proto, str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


ORT_MODES = ("faithful", "default", "none")


def ort_session(path: str | Path, mode: str = "faithful"):
    """An ONNX Runtime CPU session for a QDQ model from :func:`export_qdq`.

    ``"default"``: ONNX Runtime's defaults. Its optimizer then changes the function in two ways
    the model does not ask for: ``WeightBiasQuantization`` quantizes every float weight (to int8)
    and float bias (to int32 at ``s_x s_w``) of a Conv/Gemm/MatMul that reads a
    ``DequantizeLinear`` — qbayes keeps them float — and a ``MatMulNBits`` it fuses from a
    weight-only ``DequantizeLinear → MatMul`` (a layer whose input is not QDQ) quantizes its float
    input to int8 at the default accuracy level 4 (measured: ~1e-2 relative on a dynamic per-token
    W8A8 MLP). ``"faithful"`` (the default here): all optimizations and fusions but those two
    (``WeightBiasQuantization`` disabled, ``session.qdq_matmulnbits_accuracy_level=1``).
    ``"none"``: no graph optimization, the ONNX semantics as written.
    """
    import onnxruntime as ort

    if mode not in ORT_MODES:
        raise QBayesError(f"unknown ONNX Runtime mode {mode!r}: choose one of {ORT_MODES}")
    so = ort.SessionOptions()
    disabled = None
    if mode == "none":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif mode == "faithful":
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        disabled = ["WeightBiasQuantization"]
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def check_qdq(path: str | Path, model: nn.Module, inputs, *, mode: str = "faithful") -> float:
    """Run the exported model in ONNX Runtime (:func:`ort_session` in ``mode``) on ``inputs`` (as
    :func:`export_qdq`'s ``example_inputs``) and return the largest relative difference to
    qbayes's forward, ``max |ort − qbayes| / max |qbayes|`` over the outputs.

    Beyond float rounding, an input within float rounding of a tie rounds the other way in one
    of the two runs; that code moves every later input a little, and in a deep model more codes
    follow it (:func:`compare_codes` counts them). ``bench/onnx_qdq_check.py`` measures how far
    that goes on real models, next to qbayes's own sensitivity to a one-ulp change.
    """
    keys, args = model_inputs(inputs)
    sess = ort_session(path, mode)
    feeds = sess.get_inputs()
    if len(feeds) != len(args):
        raise QBayesError(f"{path} takes {len(feeds)} inputs, got {len(args)}")
    got = sess.run(None, {f.name: a.numpy() for f, a in zip(feeds, args)})
    ref = _reference(model, keys, args)
    if len(ref) != len(got):
        raise QBayesError(f"{path} has {len(got)} outputs, the model {len(ref)}")
    return max(float((torch.from_numpy(g).to(r.dtype) - r).abs().max() / r.abs().max().clamp(min=1e-30))
               for g, r in zip(got, ref))


def compare_codes(path: str | Path, model: nn.Module, inputs) -> dict[str, dict]:
    """Compare the activation codes ONNX Runtime computes with qbayes's, quantizer by quantizer.

    ONNX Runtime runs the file without graph optimizations (the ONNX semantics as written), with
    each ``QuantizeLinear``'s input and output added to the graph outputs. Per quantizer:

    * ``rule_mismatches``: codes where ``QuantizeLinear`` differs from qbayes's rule
      ``clamp(round(x/s) + z)`` applied to the *same* input (ONNX Runtime's): 0 means the same
      division and the same round-half-to-even;
    * ``input_drift``: ``max |x_ort − x_qbayes| / max |x_qbayes|`` of the quantizer's input;
    * ``flipped`` / ``max_step``: codes that differ between the two runs, and by how much at
      most — values that fall within ``input_drift`` of a rounding tie round to the other side,
      and each flipped code moves every later input a little more;
    * ``codes``: how many codes were compared.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    graph_inputs = [i.name for i in proto.graph.input]
    # QuantizeLinear → (Clip, for codes narrower than the container) → DequantizeLinear
    follow = {n.input[0]: n.output[0] for n in proto.graph.node if n.op_type in ("Clip", "DequantizeLinear")}
    is_dq = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    dequant = {}
    for t in follow:
        out = follow[t]
        while out not in is_dq and out in follow:
            out = follow[out]
        if out in is_dq:
            dequant[t] = out
    taps = {}
    for n in proto.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        name = _scope(n)
        if name is None or n.output[0] not in dequant:
            raise QBayesError(f"{path}: a QuantizeLinear without its module scope or its DequantizeLinear: not a "
                              "file export_qdq wrote")
        if name in taps:
            continue
        # the dequantized values are compared (numpy has no 4-bit type for the codes themselves)
        taps[name] = (n.input[0], dequant[n.output[0]])
        for t in {n.input[0], dequant[n.output[0]]} - set(graph_inputs):
            proto.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    keys, args = model_inputs(inputs)
    feeds = {f.name: a.numpy() for f, a in zip(sess.get_inputs(), args)}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)), **feeds)
    mods = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [mods[name].register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].detach()))
             for name in taps]
    try:
        _reference(model, keys, args)
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for name, (x_name, dq_name) in taps.items():
        q = mods[name]
        x_ort, x_ref = torch.from_numpy(outs[x_name]).float(), smoothed(q, seen[name].float())
        got = _codes(q, torch.from_numpy(outs[dq_name]).float(), dequantized=True)
        result[name] = {"codes": got.numel(), "rule_mismatches": int((_codes(q, x_ort) != got).sum()),
                        "input_drift": float((x_ort - x_ref).abs().max() / x_ref.abs().max().clamp(min=1e-30)),
                        "flipped": int((_codes(q, x_ref) != got).sum()),
                        "max_step": int((_codes(q, x_ref) - got).abs().max())}
    return result


def _reference(model: nn.Module, keys, args) -> list[torch.Tensor]:
    """qbayes's outputs (in eval mode, as exported)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return Flat(model, keys).run(args)[0]
    finally:
        model.train(was_training)


def _scope(node) -> str | None:
    """The qbayes module a node was traced in (from ``torch.onnx``'s name-scope metadata)."""
    import ast

    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    return None if scopes is None else ast.literal_eval(scopes)[-2].removeprefix("model.")


def _codes(q, x: torch.Tensor, dequantized: bool = False) -> torch.Tensor:
    """qbayes's codes of the (smoothed) input ``x`` in the ONNX representation (signed for symmetric);
    ``dequantized``: ``x`` is ``s (c − z)`` and the codes are read back from it."""
    axis = q.channel_axis % x.dim()
    scale, zero = along_axis(q.scale, axis, x.dim()), along_axis(q.zero, axis, x.dim())
    codes = torch.round(x / scale) + zero
    if not dequantized:
        codes = torch.clamp(codes, 0, (1 << q.spec.bits) - 1)
    return (codes - ((1 << (q.spec.bits - 1)) if q.spec.symmetric else 0)).to(torch.int32)


def _capture(flat: nn.Module, args: tuple, wanted: dict[int, dict[int, str]]):
    """``torch.export`` the model with the ``wanted`` dynamic axes (``{input index: {axis: name}}``).

    Non-strict tracing runs the Python as written, so code such as ``len(x)`` turns a size into a
    constant; TorchDynamo's strict tracing keeps it symbolic: the first that keeps every wanted
    axis dynamic wins. A range the model implies (BERT: at most 512 positions) is taken from
    ``torch.export``'s suggested fixes. (``Dim.AUTO`` is not used: it lets the tracer bake a size
    into reshapes silently when the example batch equals a model constant, such as 2 heads.)"""
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    dims: dict[str, object] = {}
    base = (tuple({a: dims.setdefault(n, torch.export.Dim(n)) for a, n in wanted[i].items()} if i in wanted else None
                  for i in range(len(args))),) if wanted else None
    errors: list[Exception] = []
    for strict in (False, True):
        shapes = base
        for _ in range(3):  # a refinement of the ranges may reveal another
            try:
                return _checked(torch.export.export(flat, args, dynamic_shapes=shapes, strict=strict), wanted)
            except Exception as e:  # noqa: BLE001 - the other tracer may succeed; every cause is kept
                errors.append(e)
                if shapes is None or "Suggested fixes" not in str(e):
                    break
                try:
                    refined = refine_dynamic_shapes_from_suggested_fixes(_fixes(str(e)), shapes)
                except Exception:  # noqa: BLE001 - no usable suggestion
                    break
                if refined == shapes or any(not isinstance(refined[0][i][a], torch.export.Dim)
                                            for i, axes in wanted.items() for a in axes):
                    break  # the code fixes a wanted size: let the other tracer try
                shapes = refined
    for later, earlier in zip(errors[1:], errors):
        if later.__cause__ is None:
            later.__cause__ = earlier
    raise errors[-1]


def _fixes(message: str) -> str:
    """The ``Suggested fixes:`` block of a ``torch.export`` constraint error (its parser takes nothing else)."""
    lines = message.split("Suggested fixes:", 1)[1].splitlines()[1:]
    return "Suggested fixes:\n" + "\n".join(itertools.takewhile(lambda line: " = " in line, lines))


def _checked(ep, wanted: dict[int, dict[int, str]]):
    """``ep`` if every wanted axis of its inputs is symbolic; raises otherwise."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[s.arg.name].meta["val"] for s in ep.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    fixed = [f"{name} (input {i}, axis {a})" for i, axes in wanted.items() for a, name in axes.items()
             if not isinstance(vals[i].shape[a], torch.SymInt)]
    if fixed:
        raise QBayesError(f"the model's code fixes the size of {', '.join(fixed)}")
    return ep


def _dynamic_axes(names: list[str], args: list[torch.Tensor], axes: dict) -> dict[int, dict[int, str]]:
    """ONNX-style ``{input name: {axis: dim name}}`` as ``{input index: {axis: dim name}}``, checked."""
    unknown = set(axes) - set(names)
    if unknown:
        raise QBayesError(f"dynamic_axes names {sorted(unknown)} are not inputs ({names})")
    out = {}
    for i, (n, a) in enumerate(zip(names, args)):
        for axis, dim in axes.get(n, {}).items():
            if not -a.dim() <= int(axis) < a.dim():
                raise QBayesError(f"dynamic axis {axis} of input {n!r} of shape {tuple(a.shape)}")
            out.setdefault(i, {})[int(axis) % a.dim()] = str(dim)
    return out


def _name_dims(proto, wanted: dict[int, dict[int, str]]) -> None:
    """Give the graph's symbolic sizes the names the caller chose (``batch``, ``seq``) instead of the tracer's."""
    rename = {}
    for i, axes in wanted.items():
        dims = proto.graph.input[i].type.tensor_type.shape.dim
        for a, name in axes.items():
            if dims[a].dim_param:
                rename[dims[a].dim_param] = name
    for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
