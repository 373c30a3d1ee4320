r"""Step-size and temperature schedules.

Cyclical SG-MCMC (Zhang, Li, Zhang, Chen & Wilson 2020, "Cyclical Stochastic Gradient MCMC for
Bayesian Deep Learning"): with :math:`K` steps in :math:`M` cycles of length
:math:`L = \lceil K/M \rceil`,

.. math:: \epsilon_k = \frac{\epsilon_0}{2}\Big[\cos\Big(\frac{\pi\,\mathrm{mod}(k, L)}{L}\Big) + 1\Big].

The first fraction ``explore`` of each cycle is exploration (temperature 0: the sampler is an
optimizer); the rest is sampling, where samples are collected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import State
from ..errors import QBayesError


@dataclass(frozen=True)
class Cyclical:
    lr0: float
    total_steps: int
    n_cycles: int
    explore: float = 0.5

    def __post_init__(self):
        if self.n_cycles < 1 or self.total_steps < self.n_cycles:
            raise QBayesError("need at least one step per cycle: make total_steps >= n_cycles")
        if not 0 <= self.explore < 1:
            raise QBayesError("explore is a fraction in [0, 1)")

    @property
    def cycle_length(self) -> int:
        return math.ceil(self.total_steps / self.n_cycles)

    def position(self, step: int) -> float:
        L = self.cycle_length
        return (step % L) / L

    def lr(self, step: int) -> float:
        return self.lr0 / 2 * (math.cos(math.pi * self.position(step)) + 1)

    def sampling(self, step: int) -> bool:
        return self.position(step) >= self.explore

    def temperature(self, T: float = 1.0):
        """A temperature schedule: 0 while exploring, ``T`` while sampling."""
        return lambda step: T if self.sampling(step) else 0.0

    def keep(self, state: State) -> bool:
        """For :class:`~qbayes.bayes.trace.Trace`: keep samples made in the sampling phase."""
        return self.sampling(state.step - 1)
