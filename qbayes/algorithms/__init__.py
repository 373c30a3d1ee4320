"""Weight solvers: pure functions ``(W, H, spec, **options) -> QuantizedWeight``.

Add a solver by writing one file here and one line in :data:`SOLVERS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import QBayesError
from .adaround import adaround
from .base import layer_objective
from .float_targets import float_target_weight
from .gptq import gptq
from .rtn import rtn


@dataclass(frozen=True)
class Solver:
    fn: Callable
    needs_hessian: bool
    options: tuple[str, ...] = ()


SOLVERS: dict[str, Solver] = {
    "rtn": Solver(rtn, needs_hessian=False),
    "gptq": Solver(gptq, needs_hessian=True, options=("block_size", "damp", "act_order", "float_targets")),
    "adaround": Solver(adaround, needs_hessian=True, options=("iters", "lr", "reg", "beta", "warmup", "exact_cols")),
}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise QBayesError(f"unknown method {name!r}: choose one of {sorted(SOLVERS)}") from None


__all__ = ["SOLVERS", "Solver", "adaround", "float_target_weight", "get_solver", "gptq", "rtn", "layer_objective"]
