"""Bit allocation under an average-bits budget, checked against brute force and an exact DP."""
import itertools
import logging
import math
import random
import sys
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import OptimizeResult

from qbayes.errors import QBayesError
from qbayes.mixed import allocate as alloc_mod
from qbayes.mixed.allocate import Allocation, allocate, size_report

LLM_SHAPES = (331776, 442368, 884736, 1179648)  # 576x576, 576x768, 576x1536, 768x1536


def code_bits(bits, sizes):
    return sum(sizes[k] * b for k, b in bits.items())


def brute_force(costs, sizes, budget):
    """Minimum summed cost over every combination within the budget."""
    names = list(costs)
    best = math.inf
    for combo in itertools.product(*(sorted(costs[k]) for k in names)):
        if sum(sizes[k] * b for k, b in zip(names, combo)) <= budget:
            best = min(best, sum(costs[k][b] for k, b in zip(names, combo)))
    return best


def dp_optimum(costs, sizes, budget):
    """Exact multiple-choice knapsack by dynamic programming over budget units of size g."""
    mins = {k: min(c) for k, c in costs.items()}
    slack = budget - sum(sizes[k] * m for k, m in mins.items())
    g = math.gcd(*(sizes[k] * (b - mins[k]) for k in costs for b in costs[k]))
    cap = slack // g
    best = np.zeros(cap + 1)  # best[s]: min cost of the layers so far using <= s units
    for k, c in costs.items():
        new = np.full(cap + 1, np.inf)
        for b, cost in c.items():
            w = sizes[k] * (b - mins[k]) // g
            if w <= cap:
                new[w:] = np.minimum(new[w:], best[: cap + 1 - w] + cost)
        best = new
    return float(best[cap])


@st.composite
def instances(draw):
    n_layers = draw(st.integers(2, 6))
    costs, sizes = {}, {}
    for i in range(n_layers):
        widths = draw(st.lists(st.sampled_from([2, 3, 4, 8]), min_size=2, max_size=4, unique=True))
        costs[f"layer{i}"] = {b: draw(st.floats(-100, 100, allow_nan=False)) for b in widths}
        sizes[f"layer{i}"] = draw(st.integers(1, 50))
    lo = sum(sizes[k] * min(c) for k, c in costs.items())
    hi = sum(sizes[k] * max(c) for k, c in costs.items())
    return costs, sizes, draw(st.integers(lo, hi + 5))


@settings(max_examples=100, deadline=None)
@given(instances())
def test_milp_matches_brute_force_and_greedy_is_feasible(inst):
    costs, sizes, budget = inst
    total = sum(sizes.values())
    opt = brute_force(costs, sizes, budget)
    for solver in ("milp", "greedy"):
        a = allocate(costs, sizes, Fraction(budget, total), solver=solver)
        assert a.solver == solver and a.budget_bits == budget
        assert set(a.bits) == set(costs) and all(b in costs[k] for k, b in a.bits.items())
        assert code_bits(a.bits, sizes) <= budget
        assert a.avg_bits == code_bits(a.bits, sizes) / total
        assert a.predicted == pytest.approx(sum(costs[k][b] for k, b in a.bits.items()), abs=1e-12)
        if solver == "milp":
            assert a.predicted == pytest.approx(opt, abs=1e-9)
            # the solver alone, without the final single-switch polish, must be optimal too
            with mock.patch.object(alloc_mod, "_polish", lambda opts, n, choice, budget: choice):
                raw = allocate(costs, sizes, Fraction(budget, total), solver=solver)
            assert raw.predicted == pytest.approx(opt, abs=1e-9) and code_bits(raw.bits, sizes) <= budget
        else:
            assert a.predicted >= opt - 1e-12


def llm_instance(seed, random_sizes):
    rng = random.Random(seed)
    sizes = {f"blk{i // 7}.lin{i % 7}": rng.randint(331776, 1179648) if random_sizes else rng.choice(LLM_SHAPES)
             for i in range(200)}
    costs = {k: {b: n * 1e-9 * 2.0 ** -b * rng.uniform(0.5, 2.0) for b in (2, 3, 4, 8)} for k, n in sizes.items()}
    for c in costs.values():  # make them strictly decreasing in bits
        c[3], c[4], c[8] = min(c[3], 0.99 * c[2]), min(c[4], 0.98 * c[2]), min(c[8], 0.97 * c[2])
        c[4], c[8] = min(c[4], 0.99 * c[3]), min(c[8], 0.98 * c[3], 0.99 * c[4])
    return costs, sizes


@pytest.mark.parametrize("avg", [2.5, 3.3, 4.25])
def test_large_llm_shapes_exact_optimum(avg):
    costs, sizes = llm_instance(1, random_sizes=False)
    total = sum(sizes.values())
    a = allocate(costs, sizes, avg)
    assert a.solver == "milp" and a.budget_bits == math.floor(Fraction(str(avg)) * total)
    assert code_bits(a.bits, sizes) <= a.budget_bits
    assert a.predicted == pytest.approx(dp_optimum(costs, sizes, a.budget_bits), rel=1e-9)
    g = allocate(costs, sizes, avg, solver="greedy")
    assert code_bits(g.bits, sizes) <= g.budget_bits
    assert a.predicted <= g.predicted + 1e-15


@pytest.mark.parametrize("avg", [2.7, 4.1])
def test_large_coprime_sizes_within_budget_and_beats_greedy(avg):
    costs, sizes = llm_instance(2, random_sizes=True)
    a = allocate(costs, sizes, avg, solver="milp")
    g = allocate(costs, sizes, avg, solver="greedy")
    for r in (a, g):
        assert code_bits(r.bits, sizes) <= r.budget_bits == math.floor(Fraction(str(avg)) * sum(sizes.values()))
    assert a.predicted <= g.predicted + 1e-15
    assert a.avg_bits > avg - 0.01  # decreasing costs: the budget is nearly used up


def small_instance(seed):
    rng = random.Random(seed)
    sizes = {f"l{i}": rng.randint(1, 1000) for i in range(8)}
    costs = {k: {b: rng.uniform(-5, 5) for b in rng.sample([2, 3, 4, 5, 6, 8, 16], 4)} for k in sizes}
    return costs, sizes


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_budget_at_minimum_gives_all_minimum_bits(solver):
    costs, sizes = llm_instance(3, random_sizes=True)
    floor_bits = sum(sizes.values()) * 2
    a = allocate(costs, sizes, 2, solver=solver)
    assert a.bits == {k: 2 for k in costs} and a.budget_bits == floor_bits and a.avg_bits == 2.0
    costs, sizes = small_instance(4)
    lo = sum(sizes[k] * min(c) for k, c in costs.items())
    a = allocate(costs, sizes, Fraction(lo, sum(sizes.values())), solver=solver)
    assert a.bits == {k: min(c) for k, c in costs.items()}


@pytest.mark.parametrize("solver", ["milp", "greedy"])
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_large_budget_gives_per_layer_argmin(solver, seed):
    costs, sizes = small_instance(seed)
    a = allocate(costs, sizes, 16, solver=solver)
    assert a.bits == {k: min(c, key=c.get) for k, c in costs.items()}
    assert a.predicted == pytest.approx(sum(min(c.values()) for c in costs.values()), abs=1e-12)


def test_float_avg_bits_is_read_as_its_decimal():
    # Fraction(4.1) * 10 is just below 41; the budget must still be 41 code bits.
    a = allocate({"a": {4: 1.0, 5: 0.0}, "b": {4: 1.0, 5: 0.5}}, {"a": 1, "b": 9}, 4.1)
    assert a.budget_bits == 41 and a.bits == {"a": 5, "b": 4}
    assert allocate({"a": {2: 0.0}}, {"a": 3}, np.float64(2.0)).budget_bits == 6


def test_size_report():
    assert size_report({"a": 4, "b": 8}, {"a": 10, "b": 30}) == {"code_bits": 280, "n_weights": 40, "avg_bits": 7.0}
    with pytest.raises(QBayesError, match="differ"):
        size_report({"a": 4}, {"b": 1})


C = {"a": {2: 1.0, 4: 0.5}, "b": {4: 0.3, 8: 0.1}}
S = {"a": 10, "b": 30}


@pytest.mark.parametrize("costs,sizes,avg,kw,match", [
    ({}, {}, 4, {}, "costs is empty"),
    (C, {"a": 10}, 4, {}, r"missing from sizes: \['b'\]"),
    (C, {**S, "c": 5}, 4, {}, r"missing from costs: \['c'\]"),
    (C, {"a": 0, "b": 30}, 4, {}, "size of layer 'a' must be >= 1"),
    (C, {"a": -3, "b": 30}, 4, {}, "size of layer 'a' must be >= 1"),
    (C, {"a": 2.5, "b": 30}, 4, {}, "size of layer 'a' must be an integer"),
    ({**C, "b": {}}, S, 4, {}, "layer 'b' has an empty set of candidate"),
    ({**C, "b": {0: 1.0}}, S, 4, {}, r"bit-width of layer 'b' must be in 1\.\.16"),
    ({**C, "b": {17: 1.0}}, S, 4, {}, r"bit-width of layer 'b' must be in 1\.\.16"),
    ({**C, "b": {4.0: 1.0}}, S, 4, {}, "bit-width of layer 'b' must be an integer"),
    ({**C, "b": {True: 1.0}}, S, 4, {}, "bit-width of layer 'b' must be an integer"),
    ({**C, "b": {4: math.nan}}, S, 4, {}, "cost of layer 'b' at 4 bits must be a finite"),
    ({**C, "b": {4: -math.inf}}, S, 4, {}, "cost of layer 'b' at 4 bits must be a finite"),
    (C, S, 3.4, {}, r"below the smallest achievable average 3\.5 bits \(= 7/2"),
    (C, S, math.nan, {}, "avg_bits must be a finite number"),
    (C, S, 4, {"solver": "cplex"}, "unknown solver 'cplex'"),
    (C, S, 4, {"time_limit": 0}, "time_limit must be a positive"),
])
def test_errors(costs, sizes, avg, kw, match):
    with pytest.raises(QBayesError, match=match):
        allocate(costs, sizes, avg, **kw)


def test_without_scipy_auto_falls_back_to_greedy_and_milp_errors(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with caplog.at_level(logging.WARNING, logger="qbayes.mixed.allocate"):
        a = allocate(C, S, 6)
    assert a.solver == "greedy" and not a.optimal and "greedy" in caplog.text
    assert code_bits(a.bits, S) <= 240
    with pytest.raises(QBayesError, match="needs scipy"):
        allocate(C, S, 6, solver="milp")


def fake_solver(monkeypatch, x_for):
    """Replace scipy's milp by one returning ``x_for(equality matrix)`` as 'optimal'."""
    _, *rest = alloc_mod._load_milp()

    def fake(c, integrality, bounds, constraints, options):
        return OptimizeResult(x=x_for(constraints[0].A.toarray()), status=0, message="fake")
    monkeypatch.setattr(alloc_mod, "_load_milp", lambda: (fake, *rest))


def test_over_budget_solver_answer_is_repaired(monkeypatch, caplog):
    costs, sizes = small_instance(8)
    # every layer at its widest candidate: over any budget below the maximum
    fake_solver(monkeypatch, lambda eq: (np.arange(eq.shape[1]) == eq.shape[1] - 1 - np.argmax(
        eq[:, ::-1], axis=1)[:, None]).any(0).astype(float))
    total = sum(sizes.values())
    with caplog.at_level(logging.WARNING, logger="qbayes.mixed.allocate"):
        a = allocate(costs, sizes, Fraction(5 * total, total), solver="milp")
    assert code_bits(a.bits, sizes) <= a.budget_bits == 5 * total
    assert not a.optimal and "exceeds the budget" in caplog.text


def test_fractional_solver_answer_is_rejected(monkeypatch):
    fake_solver(monkeypatch, lambda eq: np.full(eq.shape[1], 0.5))
    with pytest.raises(QBayesError, match="does not round to one choice per layer"):
        allocate(C, S, 6, solver="milp")


def test_allocation_is_frozen():
    a = allocate(C, S, 6)
    assert isinstance(a, Allocation) and a.optimal
    with pytest.raises(AttributeError):
        a.solver = "greedy"
