r"""Bit-width per layer under an average-bits budget (multiple-choice knapsack).

Given, for each layer :math:`l` with :math:`n_l` weights and candidate bit-widths
:math:`B_l`, a predicted loss increase :math:`c_{l,b}` of quantizing it at :math:`b` bits,
:func:`allocate` solves the integer linear program of HAWQ-V3 (Yao et al. 2021) and
Hubara et al. 2021:

.. math::

    \min_{x}\ \sum_l \sum_{b \in B_l} c_{l,b}\, x_{l,b}
    \quad\text{s.t.}\quad \sum_{b \in B_l} x_{l,b} = 1\ \ \forall l,\qquad
    \sum_l \sum_{b} n_l\, b\, x_{l,b} \le \Big\lfloor \bar b \sum_l n_l \Big\rfloor,
    \qquad x_{l,b} \in \{0, 1\},

where :math:`\bar b` is the target average number of code bits per weight. The budget is
computed and checked in exact integers; a float ``avg_bits`` is read as the decimal it
prints as (``4.1`` means 41/10, not the binary float just below it).

For the solver the budget row is rewritten relative to each layer's smallest width
:math:`m_l`, :math:`\sum n_l (b - m_l) x_{l,b} \le S := \text{budget} - \sum_l n_l m_l`, and
divided by the gcd :math:`g` of its coefficients (right-hand side :math:`\lfloor S/g
\rfloor`, an equivalent constraint in integers). Options with :math:`n_l(b-m_l) > S` are
dropped. Costs are shifted by each layer's minimum (a constant, as exactly one option is
chosen) and scaled so the largest is :data:`_COST_SCALE`, making HiGHS' absolute gap
negligible. Because the solver works to tolerances, its answer is verified: it must round
to one choice per layer, and the budget is re-checked in integers; if it is exceeded the
right-hand side is tightened by the excess and the problem re-solved, and as a last resort
the layers are downgraded (cheapest cost increase per freed bit first). Finally single-layer
switches that lower the cost and fit are applied, which only removes tolerance-level misses.

The greedy fallback starts every layer at its smallest width and repeatedly takes the
upgrade (any layer, to any wider option) with the largest cost decrease per extra code bit
that still fits, until none lowers the cost. It respects the budget but is **not**
guaranteed optimal (the knapsack is NP-hard; greedy can be arbitrarily worse).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real

from ..errors import QBayesError

log = logging.getLogger(__name__)

_MIN_BITS, _MAX_BITS = 1, 16
_SOLVERS = ("auto", "milp", "greedy")
_COST_SCALE = 1e6
_RESOLVES = 3


@dataclass(frozen=True)
class Allocation:
    r"""A bit-width per layer and what it costs.

    ``predicted`` is :math:`\sum_l c_{l,b_l}`, ``avg_bits`` is :math:`\sum n_l b_l / \sum
    n_l`, ``budget_bits`` the integer budget :math:`\lfloor \bar b \sum n_l \rfloor`.
    ``optimal`` is True only when the MILP solver proved optimality without any budget
    tightening (greedy results are never marked optimal).
    """

    bits: dict[str, int]
    predicted: float
    avg_bits: float
    budget_bits: int
    solver: str
    optimal: bool = False


def size_report(bits: Mapping[str, int], sizes: Mapping[str, int]) -> dict:
    r"""Total code bits :math:`\sum n_l b_l`, weights :math:`\sum n_l` and their ratio."""
    if not bits:
        raise QBayesError("size_report: no layers given")
    if set(bits) != set(sizes):
        raise QBayesError(f"size_report: layers differ between bits and sizes: "
                          f"{sorted(set(bits) ^ set(sizes))}")
    code = sum(_check_int(sizes[k], f"size of layer {k!r}", 1, None) * _check_bits(bits[k], k)
               for k in bits)
    n = sum(int(sizes[k]) for k in bits)
    return {"code_bits": code, "n_weights": n, "avg_bits": code / n}


def allocate(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], avg_bits: float,
             *, solver: str = "auto", time_limit: float = 60.0) -> Allocation:
    """Choose ``bits[layer]`` minimising summed ``costs[layer][bits]`` within the budget.

    Args:
        costs: per layer, candidate bit-width (int in 1..16) -> predicted loss increase
            (finite; may be negative or non-monotone in the width).
        sizes: per layer, its number of weights (positive int).
        avg_bits: target average code bits per weight; budget ``floor(avg_bits * sum n)``.
        solver: ``"auto"`` (MILP via :func:`scipy.optimize.milp`, greedy with a warning if
            scipy is unavailable), ``"milp"`` or ``"greedy"``.
        time_limit: seconds the MILP solver may run; past it the best solution found is
            returned with ``optimal=False`` and a warning.
    """
    if solver not in _SOLVERS:
        raise QBayesError(f"unknown solver {solver!r}; choose one of {_SOLVERS}")
    if isinstance(time_limit, bool) or not (isinstance(time_limit, Real) and time_limit > 0):
        raise QBayesError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    names, opts, n = _validate(costs, sizes)
    total = sum(n)
    budget = _budget(avg_bits, total)
    floor_bits = sum(nl * o[0][0] for nl, o in zip(n, opts))
    if budget < floor_bits:
        raise QBayesError(
            f"avg_bits={avg_bits!r} is below the smallest achievable average "
            f"{floor_bits / total:.9g} bits (= {Fraction(floor_bits, total)}, every layer at its "
            f"smallest candidate): budget {budget} < {floor_bits} code bits for {total} weights")
    milp = None if solver == "greedy" else _load_milp()
    if milp is None and solver == "milp":
        raise QBayesError("solver='milp' needs scipy>=1.9 (scipy.optimize.milp), which could not be imported")
    choice, optimal, used = None, False, "greedy"
    if milp is not None:
        out = _solve_milp(milp, opts, n, budget - floor_bits, time_limit)
        if out is None and solver == "milp":
            raise QBayesError("scipy.optimize.milp returned no solution (see the logged message)")
        if out is not None:
            (choice, optimal), used = out, "milp"
        else:
            log.warning("falling back to the greedy allocation (not guaranteed optimal)")
    elif solver == "auto":
        log.warning("scipy.optimize.milp unavailable; using the greedy allocation (not guaranteed optimal)")
    if choice is None:
        choice = _greedy(opts, n, budget)
    bits = {k: o[i][0] for k, o, i in zip(names, opts, choice)}
    code = sum(nl * b for nl, b in zip(n, bits.values()))
    if code > budget:  # cannot happen by construction; never return an over-budget answer
        raise QBayesError(f"internal error: allocation uses {code} > budget {budget} code bits")
    predicted = math.fsum(o[i][1] for o, i in zip(opts, choice))
    return Allocation(bits, predicted, code / total, budget, used, optimal)


def _check_int(v, what: str, lo: int, hi: int | None) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral):
        raise QBayesError(f"{what} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise QBayesError(f"{what} must be {rng}, got {v!r}")
    return int(v)


def _check_bits(b, layer: str) -> int:
    return _check_int(b, f"bit-width of layer {layer!r}", _MIN_BITS, _MAX_BITS)


def _validate(costs, sizes) -> tuple[list[str], list[list[tuple[int, float]]], list[int]]:
    """Layer names, per layer its ``(bits, cost)`` options sorted by bits, and sizes."""
    if not costs:
        raise QBayesError("costs is empty: give at least one layer with candidate bit-widths")
    missing = [k for k in costs if k not in sizes]
    extra = [k for k in sizes if k not in costs]
    if missing:
        raise QBayesError(f"layers in costs but missing from sizes: {missing}")
    if extra:
        raise QBayesError(f"layers in sizes but missing from costs: {extra}")
    names, opts, n = list(costs), [], []
    for k in names:
        n.append(_check_int(sizes[k], f"size of layer {k!r}", 1, None))
        if not costs[k]:
            raise QBayesError(f"layer {k!r} has an empty set of candidate bit-widths")
        o = []
        for b, c in costs[k].items():
            b = _check_bits(b, k)
            if isinstance(c, bool) or not isinstance(c, Real) or not math.isfinite(c):
                raise QBayesError(f"cost of layer {k!r} at {b} bits must be a finite number, got {c!r}")
            o.append((b, float(c)))
        opts.append(sorted(o))
    return names, opts, n


def _budget(avg_bits, total: int) -> int:
    """``floor(avg_bits * total)`` exactly; a float is taken as the decimal it prints as."""
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, Real) or not math.isfinite(avg_bits):
        raise QBayesError(f"avg_bits must be a finite number, got {avg_bits!r}")
    exact = Fraction(avg_bits) if isinstance(avg_bits, (Integral, Fraction)) else Fraction(repr(float(avg_bits)))
    return math.floor(exact * total)


def _load_milp():
    """``(milp, LinearConstraint, Bounds, np, sparse)`` from scipy, or None if unavailable."""
    try:
        import numpy as np
        from scipy import sparse
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        return None
    return milp, LinearConstraint, Bounds, np, sparse


def _solve_milp(mods, opts, n, slack: int, time_limit: float):
    """Optimal option index per layer, or None if the solver gave no solution."""
    milp, LinearConstraint, Bounds, np, sparse = mods
    cols = []  # (layer, option index, weight n_l (b - m_l))
    for l, (nl, o) in enumerate(zip(n, opts)):
        cols += [(l, i, nl * (b - o[0][0])) for i, (b, _) in enumerate(o) if nl * (b - o[0][0]) <= slack]
    g = math.gcd(*(w for _, _, w in cols)) or 1
    weight = [w // g for _, _, w in cols]
    base = [math.inf] * len(n)
    for l, i, _ in cols:
        base[l] = min(base[l], opts[l][i][1])
    shifted = np.array([opts[l][i][1] - base[l] for l, i, _ in cols])
    top = shifted.max()
    c = shifted * (_COST_SCALE / top) if top > 0 else shifted
    m = len(cols)
    rows = np.array([l for l, _, _ in cols])
    eq = LinearConstraint(sparse.csr_array((np.ones(m), (rows, np.arange(m))), shape=(len(n), m)), 1, 1)
    a = sparse.csr_array(np.array(weight, dtype=float)[None, :])
    rhs, optimal = slack // g, True
    for _ in range(_RESOLVES + 1):
        res = milp(c, integrality=np.ones(m), bounds=Bounds(0, 1),
                   constraints=[eq, LinearConstraint(a, -np.inf, rhs)],
                   options={"time_limit": float(time_limit), "mip_rel_gap": 0.0})
        if res.x is None:
            log.warning("scipy.optimize.milp found no solution: %s", res.message)
            return None
        if res.status != 0:
            optimal = False
            log.warning("scipy.optimize.milp did not prove optimality (%s); using its best solution", res.message)
        pick = _decode(res.x, rows, len(n), np)
        used = sum(weight[j] for j in pick)
        if used <= slack // g:
            break
        optimal = False
        log.warning("milp solution exceeds the budget by %d units (solver tolerance); tightening", used - slack // g)
        rhs = max(0, rhs - (used - slack // g))
    choice = [cols[j][1] for j in pick]
    budget = slack + _code(opts, n, [0] * len(n))
    if used > slack // g:
        choice = _repair(opts, n, choice, budget)
    return _polish(opts, n, choice, budget), optimal


def _decode(x, rows, n_layers: int, np) -> list[int]:
    """Column chosen per layer; raise unless ``x`` rounds to exactly one 1 per layer."""
    r = np.rint(x)
    binary = np.abs(x - r).max() <= 1e-3 and not ((r != 0) & (r != 1)).any()
    if not binary or not np.array_equal(np.bincount(rows, weights=r, minlength=n_layers), np.ones(n_layers)):
        raise QBayesError("scipy.optimize.milp returned a solution that does not round to one choice per layer")
    pick = np.flatnonzero(r == 1)
    return [int(j) for j in pick[np.argsort(rows[pick], kind="stable")]]


def _code(opts, n, choice) -> int:
    return sum(nl * o[i][0] for nl, o, i in zip(n, opts, choice))


def _repair(opts, n, choice, budget: int) -> list[int]:
    """Downgrade layers, least cost increase per freed code bit first, until within budget."""
    choice, used = list(choice), _code(opts, n, choice)
    while used > budget:
        _, l, j = min(((o[j][1] - o[i][1]) / (nl * (o[i][0] - o[j][0])), l, j)
                      for l, (nl, o, i) in enumerate(zip(n, opts, choice)) for j in range(i))
        used -= n[l] * (opts[l][choice[l]][0] - opts[l][j][0])
        choice[l] = j
    return choice


def _polish(opts, n, choice, budget: int) -> list[int]:
    """Apply the best single-layer switch that lowers the cost and fits, until none does."""
    choice, used = list(choice), _code(opts, n, choice)
    while True:
        best = None
        for l, (nl, o, i) in enumerate(zip(n, opts, choice)):
            for j, (b, cj) in enumerate(o):
                if cj < o[i][1] and used + nl * (b - o[i][0]) <= budget and (best is None or cj - o[i][1] < best[0]):
                    best = (cj - o[i][1], l, j)
        if best is None:
            return choice
        _, l, j = best
        used += n[l] * (opts[l][j][0] - opts[l][choice[l]][0])
        choice[l] = j


def _greedy(opts, n, budget: int) -> list[int]:
    """Upgrade by best cost decrease per extra code bit while it fits (not optimal in general)."""
    choice = [0] * len(n)
    used = _code(opts, n, choice)
    while True:
        best = None
        for l, (nl, o, i) in enumerate(zip(n, opts, choice)):
            for j in range(i + 1, len(o)):
                extra, gain = nl * (o[j][0] - o[i][0]), o[i][1] - o[j][1]
                if gain > 0 and used + extra <= budget and (best is None or gain / extra > best[0]):
                    best = (gain / extra, l, j, extra)
        if best is None:
            return choice
        _, l, j, extra = best
        used += extra
        choice[l] = j
