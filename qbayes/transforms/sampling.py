"""A bounded sample of what layers read during one calibration run, shared by the rewrites that
search a per-layer setting on real inputs (SmoothQuant's α, NoisyQuant's noise amplitude)."""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import nn


class InputSample:
    """Up to about ``rows`` input positions a module reads — every k-th row of a linear's input
    (``conv=False``, rows are the last dimension's vectors) or whole images of a convolution's —
    spread over about 8 batches (k from each batch's size). ``amax=True`` also keeps the
    per-channel ``max|x|`` over *everything* read (linear inputs only)."""

    def __init__(self, rows: int, conv: bool = False, amax: bool = False):
        self.rows, self.conv, self.track_amax = rows, conv, amax
        self.kept, self.n, self.amax = [], 0, None

    def __call__(self, _module, args):
        x = args[0].detach().float()
        items = x if self.conv else x.reshape(-1, x.shape[-1])
        if self.track_amax and items.shape[0]:
            a = items.abs().amax(0)
            self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        if self.n >= self.rows or not items.shape[0]:
            return
        per = items[0].numel() // items.shape[1] if self.conv else 1  # positions per image
        step = max(1, items.shape[0] * per * 8 // self.rows)
        take = items[::step][: math.ceil((self.rows - self.n) / per)]
        self.kept.append(take.clone())
        self.n += take.shape[0] * per

    def sample(self) -> torch.Tensor:
        return torch.cat(self.kept)


def sample_inputs(modules: Mapping[str, nn.Module], run_calibration: Callable[[], None],
                  make: Callable[[str, nn.Module], InputSample]) -> dict[str, InputSample]:
    """Run ``run_calibration()`` once without gradients with an :class:`InputSample` (``make(name,
    module)``) hooked in front of every module of ``modules``; the hooks are removed afterwards,
    also on error. Returns ``{name: sample}`` (a module nothing reached has an empty ``kept``)."""
    samples = {n: make(n, m) for n, m in modules.items()}
    handles = [m.register_forward_pre_hook(samples[n]) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run_calibration()
    finally:
        for h in handles:
            h.remove()
    return samples
