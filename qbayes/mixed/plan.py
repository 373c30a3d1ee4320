"""From a sensitivity table to per-layer specs under an average-bits budget, and the exact
storage that choice costs.

Storage of one quantized linear (``out × in`` weights, see :class:`qbayes.nn.QuantLinear`):
codes ``out · packed_length(in, b)`` bytes (``b`` bits per weight when ``in`` fills whole packing
chunks), and the overhead of ``out · n_groups`` scales (16-bit by default) plus, for asymmetric
formats, ``out · packed_length(n_groups, b)`` bytes of packed zero-points.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from ..errors import QBayesError
from ..spec import QuantSpec
from .allocate import Allocation, allocate
from .sensitivity import SensitivityTable

_SCALE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def layer_bytes(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, int]:
    """``{"code": bytes, "overhead": bytes}`` of one quantized linear (bias excluded), as its
    number format states them."""
    spec.check_layer(in_features)
    group_cols = in_features if spec.group_size <= 0 else spec.group_size
    return spec.fmt.storage_bytes(out_features, in_features, spec.bits, group_cols, spec.symmetric,
                                  _SCALE_BYTES[spec.scale_dtype])


def size_summary(specs: Mapping[str, QuantSpec], shapes: Mapping[str, tuple[int, int]]) -> dict:
    """Code and overhead bytes of the quantized layers, and both in bits per weight."""
    code = over = n = 0
    for name, s in specs.items():
        out_f, in_f = shapes[name]
        b = layer_bytes(s, out_f, in_f)
        code, over, n = code + b["code"], over + b["overhead"], n + out_f * in_f
    return {"code_bytes": code, "overhead_bytes": over, "n_weights": n,
            "code_bits_per_weight": 8 * code / n, "overhead_bits_per_weight": 8 * over / n}


def mixed_specs(table: SensitivityTable, criterion: str, avg_bits: float, *, bits: tuple[int, ...] | None = None,
                solver: str = "auto") -> tuple[dict[str, QuantSpec], Allocation]:
    """Per-layer specs minimising ``criterion``'s summed predicted loss increase with average code
    bits per weight at most ``avg_bits`` (the multiple-choice knapsack of :mod:`.allocate`)."""
    choices = tuple(bits or table.bits)
    missing = set(choices) - set(table.bits)
    if missing:
        raise QBayesError(f"the sensitivity table has no scores at {sorted(missing)} bits (it has {list(table.bits)})")
    costs = {n: {b: c for b, c in per.items() if b in choices} for n, per in table.costs(criterion).items()}
    alloc = allocate(costs, table.sizes, avg_bits, solver=solver)
    base = QuantSpec.from_dict(table.spec)
    return {n: replace(base, bits=b) for n, b in alloc.bits.items()}, alloc
