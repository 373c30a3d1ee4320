r"""What the posterior samplers share: argument checks, the DDIM move, Tweedie's estimate with its
graph, and seeded noise.

Notation of :mod:`qbayes.diffusion.schedule`: timesteps ``t`` on a grid of ``steps`` (descending,
"leading" spacing, stride ``T // steps``), the next level ``s = t − stride`` (``ᾱ_s = 1`` past the
last step), ``ε̂ = ε_θ(x_t, t)`` and ``x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t``. One DDIM(η) move
(Song, Meng & Ermon 2021, eq. 12) is

.. math:: x_s = \sqrt{ᾱ_s}\,x̂_0 + \sqrt{1 − ᾱ_s − σ_t^2}\,ε̂ + σ_t z,\qquad
          σ_t^2 = η^2 \tfrac{1−ᾱ_s}{1−ᾱ_t}\bigl(1 − \tfrac{ᾱ_t}{ᾱ_s}\bigr),

``η = 1`` being DDPM's ancestral step (over consecutive timesteps exactly Ho et al.'s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import QBayesError
from ..operators import Operator, check_sigma
from ..sampling import ddim_coefficients  # noqa: F401  (re-exported for the samplers)
from ..schedule import EpsModel, Schedule


@dataclass(frozen=True)
class Problem:
    """A checked inverse problem: ``y`` ``(1, *out_shape)`` in ``dtype``, ``shape`` of one
    sample, the descending timesteps and their stride."""

    operator: Operator
    y: torch.Tensor
    sigma_y: float
    n: int
    shape: tuple
    timesteps: list
    stride: int
    dtype: torch.dtype
    device: torch.device


def problem(schedule: Schedule, operator: Operator, y, sigma_y, n, steps, shape=None, dtype=torch.float32,
            device=None, noiseless_ok: bool = True) -> Problem:
    if not isinstance(schedule, Schedule):
        raise QBayesError(f"schedule must be a qbayes.diffusion.Schedule, got {type(schedule).__name__}")
    if not isinstance(operator, Operator):
        raise QBayesError(f"operator must be a qbayes.diffusion.operators.Operator, got {type(operator).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QBayesError(f"n (number of posterior samples) must be a positive int, got {n!r}")
    sigma_y = check_sigma(sigma_y, allow_zero=noiseless_ok)
    if shape is not None:
        operator.in_shape = operator.in_shape or tuple(shape)
        if tuple(shape) != tuple(operator.in_shape):
            raise QBayesError(f"shape {tuple(shape)} differs from the operator's input shape {operator.in_shape}")
    if operator.in_shape is None:
        raise QBayesError(f"{type(operator).__name__} needs its input shape: pass shape=... to it or to the sampler")
    ts = schedule.timesteps(steps).tolist()
    device = torch.device(device) if device is not None else torch.device("cpu")
    y = operator.check_y(y).to(device, dtype)
    return Problem(operator, y, sigma_y, n, tuple(operator.in_shape), ts, schedule.T // steps, dtype, device)


def levels(schedule: Schedule, t: int, stride: int) -> tuple[float, float]:
    """``(ᾱ_t, ᾱ_s)`` for the move from ``t`` to ``s = t − stride`` (``ᾱ_s = 1`` for ``s < 0``)."""
    a = schedule.alphas_cumprod
    return float(a[t]), (float(a[t - stride]) if t - stride >= 0 else 1.0)


def tweedie(eps_model: EpsModel, x: torch.Tensor, t: int, a_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ε̂, x̂_0)`` at ``x`` (keeping autograd's graph from ``x``)."""
    tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    eps = eps_model(x, tt)
    if eps.shape != x.shape:
        raise QBayesError(f"eps_model returned shape {tuple(eps.shape)} for input {tuple(x.shape)}")
    return eps, (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)


def randn(shape, generator: torch.Generator | None, dtype, device) -> torch.Tensor:
    """Seeded normal noise drawn on the generator's device, moved to ``device``."""
    dev = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=dev).to(device)


def check_eta(eta, positive: bool = False) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1 or (positive and eta == 0):
        raise QBayesError(f"eta must be a number in {'(0' if positive else '[0'}, 1], got {eta!r}")
    return float(eta)


def check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise QBayesError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def pigdm_r2(a_t: float, data_var: float) -> float:
    """ΠGDM's variance of ``p(x_0 | x_t) ≈ N(x̂_0, r_t² I)``, exact for data ``N(0, data_var·I)``:
    ``r_t² = v(1−ᾱ_t) / (1−ᾱ_t + v ᾱ_t)`` (``= 1 − ᾱ_t`` for ``v = 1``, the paper's
    ``σ_t²/(1+σ_t²)`` in variance-exploding units)."""
    return data_var * (1 - a_t) / (1 - a_t + data_var * a_t)


def pigdm_vector(operator, x0: torch.Tensor, y: torch.Tensor, sigma_y: float, r2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, quad)`` with ``u = (r² A Aᵀ + σ_y² I)⁻¹ (y − A x̂_0)`` (detached, ``y``-shaped) and
    ``quad = (y − A x̂_0)ᵀ u`` per row: ``−quad/2`` is the log of ΠGDM's Gaussian
    ``N(y; A x̂_0, r² A Aᵀ + σ_y² I)`` up to a constant, and ``Jᵀ Aᵀ u`` its gradient in ``x_t``."""
    if not operator.linear:
        raise QBayesError(f"ΠGDM's guidance needs a linear operator, got {type(operator).__name__}")
    if r2 == 0 and sigma_y == 0:
        raise QBayesError("r_t² A Aᵀ + σ_y² I is singular at σ_y = 0 and r_t = 0")
    r = (y - operator.forward(x0)).detach()
    u = operator.solve_gram(r, r2, sigma_y ** 2)
    return u, (r * u).reshape(r.shape[0], -1).sum(1)
