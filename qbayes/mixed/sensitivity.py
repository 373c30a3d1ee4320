"""Per-layer sensitivity of a model under every criterion, as one table that saves and reloads.

``sensitivity(model, batches)`` quantizes each selected linear with round-to-nearest at each
candidate bit-width (the perturbation ``ΔW`` every criterion scores), gathers the curvature it
needs once (:func:`qbayes.curvature.collect`, Hutchinson traces, PQI passes) and returns a
:class:`SensitivityTable` of predicted loss increases ``scores[criterion][layer][bits]``. The
model is reached through its adapter (:mod:`qbayes.models`): its loss with observed targets is
the loss whose increase is predicted (next-token cross-entropy for a language model).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..algorithms import get_solver
from ..curvature import collect
from ..errors import QBayesError
from ..models.adapter import adapter_for
from ..nn import DEFAULT_EXCLUDE
from ..spec import QuantSpec
from . import criteria as C
from .measured import measured_increase
from .pqi import pqi

CRITERIA = ("hawq", "fisher", "output", "pqi", "posterior", "measured")
DEFAULT_BITS = (2, 3, 4, 8)


@dataclass
class SensitivityTable:
    layers: list[str]
    sizes: dict[str, int]                       # weights per layer
    shapes: dict[str, tuple[int, int]]          # (out, in)
    bits: tuple[int, ...]
    spec: dict                                  # the base QuantSpec (bits varied per layer)
    scores: dict[str, dict[str, dict[int, float]]]
    info: dict = field(default_factory=dict)    # traces, timings, settings

    def costs(self, criterion: str) -> dict[str, dict[int, float]]:
        if criterion not in self.scores:
            raise QBayesError(f"criterion {criterion!r} was not computed; this table has {sorted(self.scores)}")
        return self.scores[criterion]

    def spearman(self, criterion: str, bits: int, against: str = "measured") -> float:
        """Rank correlation across layers of ``criterion`` and ``against`` at ``bits``."""
        a = [self.costs(criterion)[n][bits] for n in self.layers]
        b = [self.costs(against)[n][bits] for n in self.layers]
        return spearman(a, b)

    def to_dict(self) -> dict:
        return {"format": "qbayes-sensitivity", "version": 1, "layers": self.layers, "sizes": self.sizes,
                "shapes": {k: list(v) for k, v in self.shapes.items()}, "bits": list(self.bits), "spec": self.spec,
                "scores": {c: {n: {str(b): v for b, v in d.items()} for n, d in s.items()} for c, s in self.scores.items()},
                "info": self.info}

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise QBayesError(f"cannot read sensitivity table {path}: {e}") from e
        if d.get("format") != "qbayes-sensitivity":
            raise QBayesError(f"{path} is not a qbayes sensitivity table")
        return cls(layers=d["layers"], sizes={k: int(v) for k, v in d["sizes"].items()},
                   shapes={k: tuple(v) for k, v in d["shapes"].items()}, bits=tuple(d["bits"]), spec=d["spec"],
                   scores={c: {n: {int(b): float(v) for b, v in s.items()} for n, s in per.items()}
                           for c, per in d["scores"].items()}, info=d.get("info", {}))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    if len(a) != len(b) or len(a) < 2:
        raise QBayesError("spearman needs two sequences of equal length >= 2")
    ra, rb = _ranks(torch.tensor(a, dtype=torch.float64)), _ranks(torch.tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    for v in torch.unique(x):  # average ranks over ties
        m = x == v
        if int(m.sum()) > 1:
            r[m] = r[m].mean()
    return r


def rtn_deltas(layers: dict[str, nn.Linear], spec: QuantSpec, bits: Iterable[int], progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """``{bits: {layer: Q(W) - W}}`` with round-to-nearest at each bit-width."""
    rtn = get_solver("rtn").fn
    out = {}
    for b in bits:
        s = replace(spec, bits=b)
        out[b] = {}
        for n, lin in tqdm(layers.items(), desc=f"RTN W{b} perturbations", disable=not progress):
            W = lin.weight.detach().float()
            out[b][n] = rtn(W, None, s).dequantize(torch.float32) - W
    return out


def sensitivity(model: nn.Module, batches, *, criteria: Sequence[str] = CRITERIA, bits: Sequence[int] = DEFAULT_BITS,
                spec: QuantSpec = QuantSpec(), include=None, exclude=DEFAULT_EXCLUDE, hutchinson_samples: int = 16,
                pqi_nodes: int = 4, posterior_structure: str = "kron", posterior_num_data: float = 1e12, seed: int = 0,
                progress: bool = True) -> SensitivityTable:
    """Score every selected linear of ``model`` at every bit-width in ``bits`` under ``criteria``.

    ``batches``: the sensitivity set, in the adapter's batch language (token-id tensors
    ``(batch, seqlen)`` for an LM), each kept as one batch; the mean over batches of the mean
    loss is the loss whose increase is predicted. ``spec`` gives the group size, symmetry,
    format and range choice; its ``bits`` is replaced by each candidate.
    """
    unknown = set(criteria) - set(CRITERIA)
    if unknown:
        raise QBayesError(f"unknown criteria {sorted(unknown)}: choose from {CRITERIA}")
    bits = tuple(sorted(set(bits)))
    for b in bits:
        replace(spec, bits=b)  # validates the bit-width
    adapter = adapter_for(model)
    batches = adapter.batches(batches)
    layers = adapter.select(lambda name: spec, include, exclude)  # the same selection (and checks) as quantize_
    t = {}
    t0 = time.perf_counter()
    deltas = rtn_deltas(layers, spec, bits, progress)
    t["perturbations_s"] = time.perf_counter() - t0
    scores: dict[str, dict[str, dict[int, float]]] = {c: {n: {} for n in layers} for c in criteria}
    info: dict = {"n_samples": sum(adapter.rows(b) for b in batches), "seconds": t,
                  "hutchinson_samples": hutchinson_samples, "pqi_nodes": pqi_nodes,
                  "posterior_structure": posterior_structure, "posterior_num_data": posterior_num_data}
    if {"fisher", "output", "posterior"} & set(criteria):
        t0 = time.perf_counter()
        stats = collect(adapter, layers, batches, want=("H", "G", "ef_diag", "ggn_diag"), fisher="mc", seed=seed,
                        progress=progress)
        t["statistics_s"] = time.perf_counter() - t0
        info["n_rows"] = stats.n_rows
        for n, lin in layers.items():
            for b in bits:
                d = deltas[b][n]
                if "fisher" in criteria:
                    scores["fisher"][n][b] = C.fisher(d, stats[n])
                if "output" in criteria:
                    scores["output"][n][b] = C.output(d, stats[n])
                if "posterior" in criteria:
                    scores["posterior"][n][b] = C.posterior(d, stats[n], lin.weight.detach(), posterior_structure,
                                                            posterior_num_data)
        del stats
    if "hawq" in criteria:
        from ..curvature.hutchinson import hutchinson_trace

        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        params = {n: lin.weight for n, lin in layers.items()}
        flags = {n: p.requires_grad for n, p in params.items()}
        try:
            for p in params.values():
                p.requires_grad_(True)
            with sdpa_kernel(SDPBackend.MATH):  # the fused CPU/GPU attention kernels have no double backward
                traces = hutchinson_trace(adapter.loss, params, batches, hutchinson_samples, generator=gen,
                                          progress=progress)
        finally:
            for n, p in params.items():
                p.requires_grad_(flags[n])
        t["hutchinson_s"] = time.perf_counter() - t0
        info["hessian_trace"] = {n: {"mean": e.mean, "se": e.se} for n, e in traces.items()}
        for n in layers:
            for b in bits:
                scores["hawq"][n][b] = C.hawq(deltas[b][n], traces[n].mean / traces[n].numel)
    if "pqi" in criteria:
        t0 = time.perf_counter()
        for b in bits:
            per = pqi(adapter, layers, batches, deltas[b], nodes=pqi_nodes, progress=progress, desc=f"PQI W{b}")
            for n, v in per.items():
                scores["pqi"][n][b] = v
        t["pqi_s"] = time.perf_counter() - t0
    if "measured" in criteria:
        t0 = time.perf_counter()
        meas = measured_increase(adapter, layers, batches, {n: {b: deltas[b][n] for b in bits} for n in layers},
                                 progress=progress)
        t["measured_s"] = time.perf_counter() - t0
        for n in layers:
            scores["measured"][n] = meas[n]
    return SensitivityTable(layers=list(layers), sizes={n: lin.weight.numel() for n, lin in layers.items()},
                            shapes={n: tuple(lin.weight.shape) for n, lin in layers.items()}, bits=bits,
                            spec=spec.to_dict(), scores=scores, info=info)
