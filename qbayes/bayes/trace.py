"""Collecting samples from a chain, and averaging predictions over them."""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from torch import nn

from .base import Params, State
from ..errors import QBayesError


class Trace:
    """Keeps copies of ``state.params`` after ``burnin`` steps, every ``thin``-th step, at most
    ``max_samples`` (the most recent), and only where ``keep(state)`` holds (e.g. the sampling
    phase of a cyclical schedule). A sampler that reweights its samples (SA-SGLD) leaves the
    weight in ``state.extras["weight"]``."""

    def __init__(self, burnin: int = 0, thin: int = 1, max_samples: int | None = None,
                 keep: Callable[[State], bool] | None = None, device: str | torch.device = "cpu"):
        if thin < 1:
            raise QBayesError("thin must be at least 1 (keep every thin-th sample; 1 keeps them all)")
        self.burnin, self.thin, self.keep, self.device = burnin, thin, keep, device
        self.samples: deque[Params] = deque(maxlen=max_samples)
        self.weights: deque[float] = deque(maxlen=max_samples)

    def __call__(self, state: State) -> None:
        if state.step <= self.burnin or (state.step - self.burnin) % self.thin:
            return
        if self.keep is not None and not self.keep(state):
            return
        self.samples.append({k: v.detach().to(self.device, copy=True) for k, v in state.params.items()})
        self.weights.append(float(state.extras.get("weight", 1.0)))

    def __len__(self) -> int:
        return len(self.samples)

    def stacked(self) -> Params:
        """``{name: tensor with a leading sample dimension}``."""
        if not self.samples:
            raise QBayesError("the trace holds no samples (burn-in longer than the run?)")
        return {k: torch.stack([s[k] for s in self.samples]) for k in self.samples[0]}

    def weight_tensor(self) -> torch.Tensor:
        w = torch.tensor(list(self.weights), dtype=torch.float64)
        return w / w.sum()

    def mean(self) -> Params:
        w = self.weight_tensor()
        return {k: torch.einsum("s,s...->...", w.to(v.dtype), v) for k, v in self.stacked().items()}

    def cov(self, name: str) -> torch.Tensor:
        """Weighted covariance of the flattened parameter ``name`` over the samples."""
        x = self.stacked()[name].flatten(1).double()
        w = self.weight_tensor()
        mu = w @ x
        d = x - mu
        return (d * w[:, None]).T @ d


@torch.no_grad()
def predictive(model: nn.Module, samples: list[Params] | Trace, x: torch.Tensor,
               link: Callable[[torch.Tensor], torch.Tensor] | None = None,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Average of ``link(model(x; θ_s))`` over the samples (softmax by default)."""
    if isinstance(samples, Trace):
        weights = samples.weight_tensor() if weights is None else weights
        samples = list(samples.samples)
    if not samples:
        raise QBayesError("no samples to average over: record samples into the trace first (see Trace.keep)")
    link = link or (lambda z: torch.softmax(z, -1))
    w = weights if weights is not None else torch.full((len(samples),), 1 / len(samples), dtype=torch.float64)
    out = None
    for wi, s in zip(w.tolist(), samples):
        p = link(torch.func.functional_call(model, s, (x,))) * wi
        out = p if out is None else out + p
    return out
