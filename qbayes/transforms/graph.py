"""Where a model's layers feed each other: the chains the function-preserving rewrites act on.

A model is traced with ``torch.fx`` and read as a graph of module calls. A *chain* is a producer
(``Conv2d`` or ``Linear``), optionally a ``BatchNorm`` on its output, optionally an element-wise
activation, and — for cross-layer rewrites — the consumer layer that reads the result. Every link
must have exactly one user (a residual branch that also reads the tensor breaks the chain, since
rescaling it would change the other branch too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import QBayesError

LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# activations f with f(x / s) = f(x) / s for s > 0 (ReLU), or that a per-channel clip keeps exact (ReLU6)
POS_HOMOGENEOUS = (nn.ReLU,)
CLIPPED = (nn.ReLU6, nn.Hardtanh)


@dataclass(frozen=True)
class Chain:
    producer: str                 # qualified name of the Conv2d / Linear
    norm: str | None = None       # the BatchNorm reading it
    act: str | None = None        # the activation after it
    consumer: str | None = None   # the Conv2d / Linear reading the activation


class ChannelClip(nn.Module):
    """``clamp(x, lo, hi)`` with bounds per channel (dimension ``channel_dim``): what a ReLU6 or
    Hardtanh becomes when cross-layer equalisation rescales the channels it reads."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, channel_dim: int = 1):
        super().__init__()
        self.register_buffer("lo", lo.clone())
        self.register_buffer("hi", hi.clone())
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return torch.maximum(torch.minimum(x, self.hi.view(shape)), self.lo.view(shape))


CLIPPED = CLIPPED + (ChannelClip,)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ChannelClip) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # noqa: BLE001 - fx raises many kinds; the user needs one message
        raise QBayesError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); the "
                          "graph rewrites need a model whose forward has no data-dependent control flow") from e


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _only_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The single node reading ``node`` (looking through ``Identity`` modules, e.g. folded norms)."""
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        if not isinstance(_module(gm, node), nn.Identity):
            return node


def chains(model: nn.Module) -> list[Chain]:
    """Every producer layer of ``model`` with what follows it (see :class:`Chain`)."""
    gm = trace(model)
    out = []
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if not isinstance(mod, LAYERS):
            continue
        norm = act = consumer = None
        cur = node
        nxt = _only_user(gm, cur)
        if nxt is not None and isinstance(_module(gm, nxt), NORMS):
            norm, cur = nxt.target, nxt
            nxt = _only_user(gm, cur)
        if nxt is not None and isinstance(_module(gm, nxt), POS_HOMOGENEOUS + CLIPPED):
            act, cur = nxt.target, nxt
            nxt = _only_user(gm, cur)
        if nxt is not None and isinstance(_module(gm, nxt), LAYERS):
            consumer = nxt.target
        out.append(Chain(node.target, norm, act, consumer))
    return out


def out_channel_view(w: torch.Tensor) -> torch.Tensor:
    """A layer weight as ``(out_channels, rest)``."""
    return w.reshape(w.shape[0], -1)
