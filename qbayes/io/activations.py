"""Activation quantizers in checkpoints: what :func:`qbayes.quantize_activations_` put into a
model, recorded in ``qbayes.json`` and rebuilt on load.

Each point is recorded as ``{"kind": "input" | "module", "spec": ActSpec fields, "channel_axis"}``:
an *input* point is a layer's ``input_quant`` (run by a forward pre-hook), a *module* point an
``ActQuant`` that replaced an ``nn.Identity`` (the attention matmul operands and softmax). Their
calibrated ``scale``/``zero``, SmoothQuant ``smooth`` and NoisyQuant ``noise`` buffers are ordinary
state-dict tensors; the loader creates them at the shapes the weights file holds before the tensors
are copied in.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, QBayesError
from ..models.hf_attention import POINTS, add_attention_points
from ..nn import set_module
from ..nn.act_quant import ActQuant, attach_input_quant
from ..spec import ActSpec

BUFFERS = ("scale", "zero", "smooth", "noise")


def describe(model: nn.Module) -> dict:
    """``{point name: entry}`` for every activation quantizer of ``model``."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, ActQuant):
            continue
        if not m.calibrated:
            raise CheckpointError(f"activation quantizer {name!r} is not calibrated: run qbayes.quantize_activations_ "
                                  "with calibration data before saving")
        owner, _, leaf = name.rpartition(".")
        is_input = leaf == "input_quant" and hasattr(model.get_submodule(owner) if owner else model, "_input_quant_hook")
        out[owner if is_input else name] = {"kind": "input" if is_input else "module", "spec": m.spec.to_dict(),
                                            "channel_axis": m.channel_axis}
    return out


def restore(model: nn.Module, points: dict, header: dict, path, device=None) -> None:
    """Put the recorded quantizers back into ``model`` (before its tensors are loaded)."""
    if not isinstance(points, dict):
        raise CheckpointError(f"{path}: field 'activations' must map point names to entries")
    mods = dict(model.named_modules())
    if any(n not in mods and n.rsplit(".", 1)[-1] in POINTS for n in points):
        add_attention_points(model)  # a Hugging Face model: its attention points are not in the float model
        mods = dict(model.named_modules())
    for name, info in points.items():
        if not isinstance(info, dict) or info.get("kind") not in ("input", "module"):
            raise CheckpointError(f"{path}: activation point {name!r} is malformed")
        try:
            spec = ActSpec.from_dict(info.get("spec") or {})
        except (QBayesError, TypeError) as e:
            raise CheckpointError(f"{path}: activation point {name!r} has an invalid format: {e}") from None
        axis = info.get("channel_axis", -1)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise CheckpointError(f"{path}: activation point {name!r} has a malformed channel axis {axis!r}")
        quant = ActQuant(spec, channel_axis=axis)
        if info["kind"] == "input":
            if name not in mods or hasattr(mods[name], "input_quant"):
                raise CheckpointError(f"{path}: the model has no layer {name!r} to take an input quantizer")
            attach_input_quant(mods[name], quant)
            prefix = f"{name}.input_quant."
        else:
            if not isinstance(mods.get(name), (nn.Identity, ActQuant)):
                raise CheckpointError(f"{path}: the model has no quantization point {name!r}")
            set_module(model, name, quant)
            prefix = f"{name}."
        quant.observer = None  # static ranges come from the file
        for buf in BUFFERS:
            entry = header.get(prefix + buf)
            if entry is not None:
                setattr(quant, buf, torch.empty(entry[1], device=device))
        if not spec.dynamic and quant.scale is None:
            raise CheckpointError(f"{path}: the static activation quantizer {name!r} has no scale in the weights file")
