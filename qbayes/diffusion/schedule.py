r"""The DDPM forward process (Ho et al. 2020) shared by every sampler, posterior sampler and
quantization method in :mod:`qbayes.diffusion`.

A schedule is the variance sequence ``β_1..β_T``; with ``α_t = 1 − β_t`` and ``ᾱ_t = Π_{s≤t} α_s``
the noised sample at timestep ``t`` (0-based index ``t = 0..T−1``, as ``diffusers`` counts) is

.. math::  x_t = \sqrt{\bar α_t}\,x_0 + \sqrt{1 − \bar α_t}\,ε,\qquad ε \sim N(0, I),

and a denoiser ``eps_model(x_t, t) -> ε̂`` (``t`` an int64 tensor of shape ``(B,)``) predicts ``ε``.
Everything is stored in float64 and cast to the sample's dtype where it is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import QBayesError

#: ``eps_model(x_t, t)``: noise prediction for samples ``x_t`` ``(B, ...)`` at int64 timesteps ``t`` ``(B,)``
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Schedule:
    """``betas`` ``(T,)`` float64 in (0, 1); see the module docstring."""

    betas: torch.Tensor

    def __post_init__(self):
        b = torch.as_tensor(self.betas, dtype=torch.float64).flatten()
        if b.numel() == 0 or not bool(torch.isfinite(b).all()) or bool(((b <= 0) | (b >= 1)).any()):
            raise QBayesError("a diffusion schedule needs T >= 1 finite betas in (0, 1)")
        object.__setattr__(self, "betas", b)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - b, 0))

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """Ho et al.'s linear schedule (``diffusers``' ``"linear"``)."""
        return cls(torch.linspace(beta_start, beta_end, _steps(T), dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "Schedule":
        """Nichol & Dhariwal's cosine schedule (``diffusers``' ``"squaredcos_cap_v2"``)."""
        T = _steps(T)
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return cls(torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)],
                                dtype=torch.float64))

    @property
    def T(self) -> int:
        return self.betas.numel()

    def abar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``ᾱ_t`` shaped to broadcast against ``like`` ``(B, ...)`` (``t`` scalar or ``(B,)``); a
        negative ``t`` means "before the first step" (``ᾱ = 1``)."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0).cpu()], torch.ones((), dtype=torch.float64))
        return a.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Tweedie's ``E[x_0 | x_t] = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t`` for an exact ``ε̂``."""
        a = self.abar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def predict_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        a = self.abar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def timesteps(self, steps: int) -> torch.Tensor:
        """``steps`` evenly spaced timesteps, descending, ``diffusers``' DDIM ``"leading"`` spacing
        (``T // steps · k``); ``steps = T`` gives every timestep."""
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.T:
            raise QBayesError(f"steps must be an int in 1..{self.T} (the schedule's T), got {steps!r}")
        return (torch.arange(steps, dtype=torch.long) * (self.T // steps)).flip(0)


def _steps(T) -> int:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise QBayesError(f"T (diffusion steps) must be a positive int, got {T!r}")
    return T
