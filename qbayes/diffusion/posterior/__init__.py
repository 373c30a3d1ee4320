"""Posterior samplers for inverse problems with a diffusion prior (issue 15): DPS, ΠGDM, RED-diff
and an asymptotically exact SMC sampler (TDS). Every sampler is
``f(eps_model, schedule, operator, y, sigma_y, n, steps, generator, progress=False, **hyper)``
and returns ``(n, *shape)`` samples (SMC: an :class:`SMCResult` with them and its ESS history)."""
from .dps import dps
from .pigdm import pigdm
from .reddiff import reddiff
from .smc import SMCResult, smc

__all__ = ["SMCResult", "dps", "pigdm", "reddiff", "smc"]
