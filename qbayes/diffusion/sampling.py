r"""Samplers for ε-prediction diffusion models, with hooks, and calibration sets drawn across
their trajectories.

Notation of :mod:`qbayes.diffusion.schedule`: ``ᾱ_t`` the cumulative product, ``ε̂ = ε_θ(x_t, t)``,
and the Tweedie estimate ``x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t``.

* DDIM (Song, Meng & Ermon 2021, eq. 12) from ``ᾱ_t`` to the next level ``ᾱ_s`` of a grid of
  ``steps`` timesteps (``diffusers``' "leading" spacing, ``s = t − T//steps``; the last step goes
  to ``ᾱ = 1``, i.e. returns ``x̂_0``):

  .. math:: x_s = \sqrt{ᾱ_s}\,x̂_0 + \sqrt{1 − ᾱ_s − σ_t^2}\,ε̂ + σ_t z,\qquad
            σ_t = η \sqrt{\tfrac{1−ᾱ_s}{1−ᾱ_t}}\sqrt{1 − \tfrac{ᾱ_t}{ᾱ_s}},

  ``η = 0`` the deterministic sampler (the probability-flow ODE's discretisation), ``η = 1``
  DDPM's posterior variance. With ``η > 0`` one ``z`` is drawn every step (the last included,
  where ``σ = 0``), as ``diffusers.DDIMScheduler`` does, so a seeded generator gives its samples.
* DDPM ancestral sampling (Ho, Jain & Abbeel 2020, eq. 7) over every timestep, the mean of
  ``q(x_{t−1} | x_t, x̂_0)`` plus ``√β̃_t z`` (``z`` drawn for ``t > 0`` only):

  .. math:: x_{t−1} = \frac{\sqrt{ᾱ_{t−1}}β_t}{1−ᾱ_t}x̂_0 + \frac{\sqrt{α_t}(1−ᾱ_{t−1})}{1−ᾱ_t}x_t
            + \sqrt{β̃_t}\,z,\qquad β̃_t = \frac{1−ᾱ_{t−1}}{1−ᾱ_t}β_t.
* DDIM inversion (Song et al. §4.3; Mokady et al. 2023): the ``η = 0`` step run upward, from
  ``ᾱ_s`` to ``ᾱ_t`` with ``ε̂ = ε_θ(x_s, t)`` (``diffusers.DDIMInverseScheduler``).

Every sampler calls each hook as ``hook(step, t, x_t, eps)`` after the model call of each step
(``step`` the 0-based index, ``t`` a 0-d int64 tensor, ``x_t`` the model's input, ``eps`` its
output; hooks must not change them in place). Gradients are not switched off: posterior
samplers differentiate through the model; wrap plain sampling in ``torch.no_grad()``.

:class:`TimestepRecorder` keeps a bounded sample of ``(x_t, t)`` along a trajectory, and
:func:`calibration_batches` turns seeded DDIM runs into denoiser calibration batches across
timesteps, as Q-Diffusion (Li et al. 2023) does; :func:`naive_calibration_batches` is the
single-timestep baseline it improves on.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import QBayesError
from .schedule import EpsModel, Schedule

#: ``hook(step, t, x_t, eps)``, called after the model call of every sampler step
Hook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


# ------------------------------------------------------------------ one step (pure functions)
def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_s: float, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM move of ``x`` from level ``ᾱ_t`` to ``ᾱ_s`` given ``ε̂`` (module docstring). With
    ``eta = 0`` it runs either way (``ᾱ_s > ᾱ_t`` denoises, ``ᾱ_s < ᾱ_t`` inverts); ``noise`` is
    the ``z`` of the ``σ_t z`` term (needed when ``eta > 0``)."""
    x0 = (x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
    c0, ce, sd = ddim_coefficients(abar_t, abar_s, eta)
    out = c0 * x0 + ce * eps
    if sd > 0:
        if noise is None:
            raise QBayesError("ddim_step with eta > 0 needs the noise z of its σ_t·z term")
        out = out + sd * noise
    return out


def ddim_coefficients(abar_t: float, abar_s: float, eta: float) -> tuple[float, float, float]:
    """``(√ᾱ_s, √(1−ᾱ_s−σ²), σ)`` of the DDIM(η) move from ``ᾱ_t`` to ``ᾱ_s``:
    ``x_s = √ᾱ_s x̂_0 + √(1−ᾱ_s−σ²) ε̂ + σ z`` with ``σ² = η² (1−ᾱ_s)/(1−ᾱ_t) (1−ᾱ_t/ᾱ_s)``."""
    var = eta ** 2 * (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s) if eta > 0 else 0.0
    return math.sqrt(abar_s), math.sqrt(max(1.0 - abar_s - var, 0.0)), math.sqrt(max(var, 0.0))


def ddpm_step(x: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral DDPM step from ``ᾱ_t`` to ``ᾱ_{t−1}`` (module docstring); without ``noise``
    the posterior mean alone (the last step, ``t = 0``)."""
    alpha = abar_t / abar_prev
    beta = 1.0 - alpha
    x0 = (x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
    out = (math.sqrt(abar_prev) * beta / (1.0 - abar_t)) * x0 + (math.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar_t)) * x
    if noise is not None:
        out = out + math.sqrt(max((1.0 - abar_prev) / (1.0 - abar_t) * beta, 1e-20)) * noise
    return out


# ------------------------------------------------------------------------------ samplers
def ddim_sample(eps_model: EpsModel, schedule: Schedule, x_T: torch.Tensor, steps: int = 50, eta: float = 0.0,
                generator: torch.Generator | None = None, hooks: Hook | Sequence[Hook] = (),
                progress: bool = False) -> torch.Tensor:
    """DDIM from ``x_T`` over ``steps`` timesteps of ``schedule`` to ``x_0`` (``diffusers``'
    ``DDIMScheduler`` with ``set_alpha_to_one=True``, ``clip_sample=False``, epsilon
    prediction, "leading" spacing). ``eta = 0`` is deterministic (``generator`` unused)."""
    x, hooks = _check_sample(x_T, "x_T"), _hooks(hooks)
    eta = _check_eta(eta)
    ts, stride = schedule.timesteps(steps).tolist(), schedule.T // steps
    for i, t in enumerate(tqdm(ts, desc="DDIM", unit="step", disable=not progress)):
        eps = _eps(eps_model, x, t, i, hooks)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta > 0 else None
        x = ddim_step(x, eps, _abar(schedule, t), _abar(schedule, t - stride), eta, noise)
    return x


def ddpm_sample(eps_model: EpsModel, schedule: Schedule, x_T: torch.Tensor, generator: torch.Generator | None = None,
                hooks: Hook | Sequence[Hook] = (), progress: bool = False) -> torch.Tensor:
    """Ancestral sampling over all ``T`` timesteps (``diffusers``' ``DDPMScheduler`` with
    ``variance_type="fixed_small"``, ``clip_sample=False``, epsilon prediction)."""
    x, hooks = _check_sample(x_T, "x_T"), _hooks(hooks)
    for i, t in enumerate(tqdm(range(schedule.T - 1, -1, -1), desc="DDPM", unit="step", disable=not progress)):
        eps = _eps(eps_model, x, t, i, hooks)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if t > 0 else None
        x = ddpm_step(x, eps, _abar(schedule, t), _abar(schedule, t - 1), noise)
    return x


def ddim_invert(eps_model: EpsModel, schedule: Schedule, x_0: torch.Tensor, steps: int = 50,
                hooks: Hook | Sequence[Hook] = (), progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM inversion of ``x_0`` up the grid of ``steps`` timesteps to ``x_T``
    (``diffusers``' ``DDIMInverseScheduler``); :func:`ddim_sample` with ``eta = 0`` maps it
    back up to the discretisation error, which shrinks as ``steps`` grows."""
    x, hooks = _check_sample(x_0, "x_0"), _hooks(hooks)
    ts, stride = schedule.timesteps(steps).flip(0).tolist(), schedule.T // steps
    for i, t in enumerate(tqdm(ts, desc="DDIM inversion", unit="step", disable=not progress)):
        eps = _eps(eps_model, x, t, i, hooks)
        x = ddim_step(x, eps, _abar(schedule, t - stride), _abar(schedule, t))
    return x


# ------------------------------------------------------------------------ calibration sets
class TimestepRecorder:
    """A hook keeping a bounded sample of the denoiser's inputs ``(x_t, t)`` along a trajectory.

    It records at every ``every``-th step (and only at the timesteps in ``timesteps``, if
    given) ``per_step`` rows (all if ``None``), chosen by a generator seeded from ``seed`` and the
    step, so different steps keep different images. For a trajectory run in chunks of rows,
    set ``window = (first row, total rows)`` before each chunk: the rows kept are then those a
    single run over all rows would keep. At most ``per_step · ⌈steps / every⌉`` rows are kept.
    """

    def __init__(self, per_step: int | None = None, every: int = 1, timesteps: Iterable[int] | None = None,
                 seed: int = 0):
        if per_step is not None:
            _positive(per_step, "per_step")
        self.per_step, self.every, self.seed = per_step, _positive(every, "every"), int(seed)
        self.timesteps = None if timesteps is None else {int(t) for t in timesteps}
        self.window: tuple[int, int] | None = None
        self._kept: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def wants(self, step: int, t: int) -> bool:
        return step % self.every == 0 and (self.timesteps is None or t in self.timesteps)

    def __call__(self, step: int, t: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor) -> None:
        if not self.wants(step, int(t)):
            return
        first, total = self.window or (0, x_t.shape[0])
        rows = torch.arange(total)
        if self.per_step is not None and self.per_step < total:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            rows = torch.randperm(total, generator=g)[:self.per_step].sort().values
        rows = rows[(rows >= first) & (rows < first + x_t.shape[0])] - first
        if rows.numel():
            x = x_t.detach()[rows.to(x_t.device)]
            self._kept.append((step, x, torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)))

    def __len__(self) -> int:
        return sum(x.shape[0] for _, x, _ in self._kept)

    def clear(self) -> None:
        self._kept.clear()

    def batches(self, batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The kept pairs in step order (rows in order within a step) as ``(x_t, t)`` batches of
        ``batch_size`` rows (one batch if ``None``)."""
        if not self._kept:
            raise QBayesError("the TimestepRecorder kept nothing: run a sampler with it as a hook first")
        kept = sorted(self._kept, key=lambda k: k[0])  # stable: chunks stay in row order within a step
        x, t = torch.cat([k[1] for k in kept]), torch.cat([k[2] for k in kept])
        size = x.shape[0] if batch_size is None else _positive(batch_size, "batch_size")
        return list(zip(x.split(size), t.split(size)))


def calibration_batches(eps_model: EpsModel, schedule: Schedule, n: int, shape: Sequence[int], steps: int = 50,
                        per_step: int | None = None, every: int = 1, timesteps: Iterable[int] | None = None,
                        seed: int = 0, batch_size: int = 32, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32, progress: bool = False
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Denoiser calibration data across timesteps (Q-Diffusion's time-step-aware calibration):
    run DDIM (``eta = 0``, ``steps`` steps) from ``n`` seeded noise images of ``shape``
    (``(C, H, W)``) in chunks of ``batch_size``, record with a :class:`TimestepRecorder`
    (``per_step``, ``every``, ``timesteps``), and return the ``(x_t, t)`` pairs as batches of
    ``batch_size`` rows, in step order, on ``device`` (default: the model's, else CPU).

    The result is a function of the arguments only: the noise comes from ``seed`` on the CPU,
    whatever the device. ``timesteps`` (timesteps of the DDIM grid ``schedule.timesteps(steps)``)
    keeps only those; sampling stops after the last one needed.
    """
    n, batch_size = _positive(n, "n"), _positive(batch_size, "batch_size")
    shape = tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise QBayesError(f"shape must be the per-sample shape, e.g. (channels, height, width), got {shape!r}")
    grid = schedule.timesteps(steps).tolist()
    if timesteps is not None:
        timesteps = [int(t) for t in timesteps]
        off = sorted(set(timesteps) - set(grid))
        if off:
            raise QBayesError(f"timesteps {off} are not on the {steps}-step DDIM grid {grid}")
    recorder = TimestepRecorder(per_step, every, timesteps, seed)
    wanted = [i for i, t in enumerate(grid) if recorder.wants(i, t)]
    if not wanted:
        raise QBayesError(f"no step of the {steps}-step DDIM grid is recorded with every={every}, timesteps={timesteps}")
    last = wanted[-1]

    def stop(step, t, x_t, eps):
        if step >= last:
            raise _Done

    device = torch.device(device) if device is not None else _device_of(eps_model)
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    with torch.no_grad():
        for first in tqdm(range(0, n, batch_size), desc="calibration trajectories", disable=not progress):
            recorder.window = (first, n)
            try:
                ddim_sample(eps_model, schedule, x_T[first:first + batch_size], steps, hooks=(recorder, stop))
            except _Done:
                pass
    return recorder.batches(batch_size)


def naive_calibration_batches(eps_model: EpsModel, schedule: Schedule, n: int, shape: Sequence[int],
                              t: int | None = None, steps: int = 50, seed: int = 0, batch_size: int = 32,
                              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                              progress: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The single-timestep baseline: all ``n`` rows at one timestep ``t`` of the DDIM grid
    (default its first, ``x_T`` itself, the pure noise), i.e. :func:`calibration_batches` with
    ``timesteps=[t]``."""
    t = schedule.timesteps(steps)[0].item() if t is None else t
    return calibration_batches(eps_model, schedule, n, shape, steps, timesteps=[t], seed=seed,
                               batch_size=batch_size, device=device, dtype=dtype, progress=progress)


# ------------------------------------------------------------------------ diffusers bridges
class UNetEps(nn.Module):
    """``eps_model(x_t, t) = unet(x_t, t).sample``: a ``diffusers`` ``UNet2DModel`` as an
    :data:`~qbayes.diffusion.schedule.EpsModel` (gradients flow through it)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.unet(x_t, t)
        return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out


def eps_model_of(unet: nn.Module) -> UNetEps:
    """The ε-model of a ``diffusers`` denoiser called as ``unet(x_t, t).sample``."""
    if not isinstance(unet, nn.Module):
        raise QBayesError(f"eps_model_of takes a torch nn.Module denoiser, not {type(unet).__name__}")
    return unet if isinstance(unet, UNetEps) else UNetEps(unet)


def schedule_of(scheduler) -> Schedule:
    """The :class:`Schedule` of a ``diffusers`` scheduler, from its ``betas`` (its timestep spacing,
    offsets and clipping are not carried over: qbayes's samplers use "leading" spacing, no
    clipping). Only epsilon prediction is supported."""
    betas = getattr(scheduler, "betas", None)
    if not isinstance(betas, torch.Tensor):
        raise QBayesError(f"{type(scheduler).__name__} has no betas tensor: pass a diffusers scheduler")
    config = getattr(scheduler, "config", None) or {}
    kind = config.get("prediction_type", "epsilon") if hasattr(config, "get") else "epsilon"
    if kind != "epsilon":
        raise QBayesError(f"the scheduler predicts {kind!r}; qbayes's samplers take epsilon-prediction models")
    return Schedule(betas.detach().double().cpu())


# ---------------------------------------------------------------------------------- helpers
class _Done(Exception):
    """Raised by the stop hook of :func:`calibration_batches` once everything wanted is recorded."""


def _abar(schedule: Schedule, t: int) -> float:
    """``ᾱ_t`` in float64 as a Python float; ``1`` before the first step (``t < 0``)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _eps(eps_model: EpsModel, x: torch.Tensor, t: int, step: int, hooks: tuple) -> torch.Tensor:
    """``ε̂ = eps_model(x, t)`` checked, then handed to every hook."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    eps = eps_model(x, tt)
    if not isinstance(eps, torch.Tensor):
        raise QBayesError(f"eps_model returned a {type(eps).__name__}, not a tensor (for a diffusers UNet pass "
                          "qbayes.diffusion.eps_model_of(unet))")
    if eps.shape != x.shape:
        raise QBayesError(f"eps_model returned shape {tuple(eps.shape)} for x_t of shape {tuple(x.shape)} "
                          f"(step {step}, t={t}): it must predict the noise, shaped like x_t")
    eps = eps.to(x.dtype)
    t0 = torch.tensor(t, dtype=torch.long)
    for hook in hooks:
        hook(step, t0, x, eps)
    return eps


def _check_sample(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise QBayesError(f"{what} must be a floating-point tensor, got {type(x).__name__}"
                          + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() < 1 or x.shape[0] < 1 or not x.numel():
        raise QBayesError(f"{what} must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise QBayesError(f"{what} holds NaN/Inf values")
    return x


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise QBayesError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta!r}")
    return float(eta)


def _hooks(hooks) -> tuple:
    hooks = (hooks,) if callable(hooks) else tuple(hooks)
    bad = [h for h in hooks if not callable(h)]
    if bad:
        raise QBayesError(f"hooks must be callables hook(step, t, x_t, eps), got {type(bad[0]).__name__}")
    return hooks


def _positive(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise QBayesError(f"{what} must be a positive int, got {v!r}")
    return v


def _device_of(eps_model) -> torch.device:
    if isinstance(eps_model, nn.Module):
        for p in (*eps_model.parameters(), *eps_model.buffers()):
            return p.device
    return torch.device("cpu")
