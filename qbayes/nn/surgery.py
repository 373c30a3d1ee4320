"""Module surgery: find linears by name and swap modules in place."""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

from torch import nn

from ..errors import QBayesError

# Kept in float unless a user names them: embeddings and the output head are small in number
# but large in effect.
DEFAULT_EXCLUDE = ("lm_head", "*embed*", "*wte*", "*wpe*")


def name_filter(include: Iterable[str] | None = None, exclude: Iterable[str] | None = DEFAULT_EXCLUDE) -> Callable[[str], bool]:
    """A predicate over module names from glob patterns (``*`` matches dots too)."""
    inc = list(include) if include else ["*"]
    exc = list(exclude) if exclude else []

    def keep(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in inc) and not any(
            fnmatch.fnmatchcase(name, p) or name.split(".")[-1] == p for p in exc)

    return keep


def find_linears(root: nn.Module, keep: Callable[[str], bool] | None = None, prefix: str = "") -> dict[str, nn.Linear]:
    """``{qualified name: nn.Linear}`` for every ``nn.Linear`` under ``root`` the filter keeps
    (see :func:`check_selection` for refusing explicitly named non-linear modules)."""
    out = {}
    for name, mod in root.named_modules():
        if not name:
            continue
        full = f"{prefix}{name}"
        if keep is not None and not keep(full):
            continue
        if isinstance(mod, nn.Linear):
            out[full] = mod
    return out


def check_selection(root: nn.Module, patterns: Iterable[str], kinds: tuple[type, ...] = (nn.Linear,)) -> None:
    """Every explicit (wildcard-free) pattern must name an existing layer of one of ``kinds``."""
    mods = dict(root.named_modules())
    for p in patterns:
        if any(ch in p for ch in "*?["):
            continue
        if p not in mods:
            raise QBayesError(f"no module named {p!r} in the model")
        if not isinstance(mods[p], kinds):
            raise QBayesError(
                f"cannot quantize {p!r}: it is a {type(mods[p]).__name__}, and only "
                f"{' and '.join('nn.' + k.__name__ for k in kinds)} layers are supported so far")


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)



def weight_matrix(layer: nn.Module):
    """The ``(out, in)`` matrix a solver quantizes: a linear's weight, or a convolution's kernel
    flattened to ``(out, in/groups · kh · kw)`` (what multiplies its im2col patches)."""
    if isinstance(layer, nn.Conv2d):
        return layer.weight.reshape(layer.out_channels, -1)
    if isinstance(layer, nn.Linear):
        return layer.weight
    raise QBayesError(f"only nn.Linear and nn.Conv2d layers are quantized, not {type(layer).__name__}")


def packed_like(layer: nn.Module, qw, spec) -> nn.Module:
    """The runtime module with packed storage replacing ``layer`` (``QuantLinear``/``QuantConv2d``),
    keeping the layer's input quantizer and low-rank branch if it has them."""
    from .act_quant import attach_input_quant
    from .lowrank import attach_lowrank
    from .quant_conv import QuantConv2d
    from .quant_linear import QuantLinear

    if isinstance(layer, nn.Conv2d):
        new = QuantConv2d.from_quantized(qw, spec, layer)
    else:
        new = QuantLinear.from_quantized(qw, spec, layer.bias)
    if hasattr(layer, "input_quant"):  # its activation quantizer moves with it
        attach_input_quant(new, layer.input_quant)
    if hasattr(layer, "lowrank"):  # and its float low-rank branch (SVDQuant)
        attach_lowrank(new, layer.lowrank)
    return new
