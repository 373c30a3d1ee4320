r"""Hutchinson's stochastic estimate of the trace of each parameter block of the loss Hessian.

For the loss averaged over ``B`` batches, :math:`L(\theta) = \frac1B \sum_b L_b(\theta)`, with
Hessian :math:`H = \nabla^2 L` and a probe :math:`v` with independent entries of mean 0 and
variance 1 (Rademacher :math:`\pm 1`, or standard normal),

.. math::  \mathbb E\,[v^\top H v] = \sum_{ij} H_{ij}\,\mathbb E[v_i v_j] = \operatorname{tr} H
           \qquad \text{(Hutchinson 1989)}.

Splitting :math:`\theta` into blocks (one per weight tensor) and drawing one probe for all of
them, :math:`v_k^\top (H v)_k` is unbiased for :math:`\operatorname{tr} H_{kk}` of the diagonal
block :math:`k`, because the cross terms :math:`H_{ij}\,\mathbb E[v_i v_j]` vanish for
:math:`i \ne j` inside and across blocks. So one Hessian-vector product per probe serves every
block at once (HAWQ-V2, Dong et al. 2020, uses :math:`\operatorname{tr} H_{kk} / n_k` to rank
layers for mixed precision). The variance of one sample is, for Rademacher probes,

.. math::  \operatorname{Var}\big[v_k^\top (H v)_k\big] = 2 \sum_{i \ne j \in k} H_{ij}^2
           + \sum_{i \in k,\, j \notin k} H_{ij}^2 ,

and for Gaussian probes :math:`2\sum_{i,j \in k} H_{ij}^2 + \sum_{i\in k, j\notin k} H_{ij}^2`:
Rademacher probes are exact on a diagonal Hessian, Gaussian ones are not.

:math:`Hv` is computed without forming :math:`H` by double backward,
:math:`Hv = \nabla_\theta (\nabla_\theta L_b \cdot v)`, and averaged over batches with the
same :math:`v`. Each batch runs one forward and one ``create_graph`` backward, then one
double backward per probe; probes are regenerated from per-probe seeds rather than stored,
so memory stays at a few copies of the parameters whatever the number of probes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import QBayesError

_DISTRIBUTIONS = ("rademacher", "gaussian")
_MAX_EXACT_ENTRIES = 20000
_SEED_SPACING = 0x9E3779B97F4A7C15  # odd constant: distinct seeds for each device's generator


@dataclass
class TraceEstimate:
    """Hutchinson estimate of ``tr(H_kk)`` for one parameter block.

    Attributes:
        mean: the estimate, the mean of :attr:`samples`.
        se: standard error of the mean, ``std(samples, ddof=1) / sqrt(n)`` (NaN for one probe).
        samples: per probe, ``v_kᵀ (H v)_k`` with ``H`` the Hessian of the batch-mean loss.
        numel: number of parameters in the block.
    """

    mean: float
    se: float
    samples: list[float] = field(repr=False)
    numel: int

    @property
    def per_param(self) -> float:
        """``tr(H_kk) / n_k``: the mean Hessian eigenvalue of the block, HAWQ-V2's sensitivity."""
        return self.mean / self.numel


def _check_params(params: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    if not isinstance(params, Mapping) or not params:
        raise QBayesError("params must be a non-empty mapping of name -> tensor with requires_grad=True")
    names, tensors, seen = list(params), list(params.values()), {}
    for name, p in zip(names, tensors):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise QBayesError(f"param {name!r} must be a floating-point tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise QBayesError(f"param {name!r} does not require grad; call .requires_grad_() on it first")
        if id(p) in seen:
            raise QBayesError(f"params {seen[id(p)]!r} and {name!r} are the same tensor (tied weights?); "
                              "pass it once")
        seen[id(p)] = name
    return names, tensors


def _batch_list(batches: Iterable | None) -> Iterable:
    return [None] if batches is None else batches


def _gradients(loss_fn: Callable[[Any], torch.Tensor], names: list[str], tensors: list[torch.Tensor],
               batch: Any, index: int) -> list[torch.Tensor]:
    """``∇_θ L_b`` with its graph kept (``create_graph=True``), after checking the loss."""
    loss = loss_fn(batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise QBayesError(f"loss_fn must return a scalar tensor; batch {index} gave {shape}")
    if not torch.isfinite(loss.detach()).all():
        raise QBayesError(f"loss of batch {index} is not finite ({loss.item()}); check the inputs and the model")
    if not loss.requires_grad:
        raise QBayesError(f"the loss of batch {index} does not depend on any of the params {names}")
    grads = torch.autograd.grad(loss.reshape(()), tensors, create_graph=True, allow_unused=True)
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        raise QBayesError(f"the loss of batch {index} does not depend on params {unused}; remove them")
    return list(grads)


def _hvp(grads: list[torch.Tensor], tensors: list[torch.Tensor], vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` for the Hessian whose gradient is ``grads`` (zero blocks where ``grads`` is constant)."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(t) for t in tensors]
    hv = torch.autograd.grad([grads[i] for i in live], tensors, grad_outputs=[vs[i] for i in live],
                             retain_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if h is None else h for h, t in zip(hv, tensors)]


def _probe(tensors: list[torch.Tensor], seed: int, distribution: str) -> list[torch.Tensor]:
    """One probe set, a function of ``seed`` only, so it can be regenerated for every batch.

    Each device gets its own generator with a distinct seed, so blocks on different devices
    do not share a random stream (which would correlate their probes and bias the estimate).
    """
    gens: dict[torch.device, torch.Generator] = {}
    out = []
    for t in tensors:
        gen = gens.get(t.device)
        if gen is None:
            gen = torch.Generator(device=t.device).manual_seed((seed + len(gens) * _SEED_SPACING) % 2**63)
            gens[t.device] = gen
        if distribution == "rademacher":
            v = torch.randint(0, 2, t.shape, generator=gen, device=t.device, dtype=t.dtype).mul_(2).sub_(1)
        else:
            v = torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
        out.append(v)
    return out


def _block_dots(vs: list[torch.Tensor], hvs: list[torch.Tensor]) -> list[float]:
    """``v_kᵀ (Hv)_k`` per block, accumulated in at least float32, read back with one sync per device."""
    dots = []
    for v, h in zip(vs, hvs):
        work = torch.promote_types(v.dtype, torch.float32)
        dots.append(torch.dot(v.reshape(-1).to(work), h.reshape(-1).to(work)).to(torch.float64))
    if len({d.device for d in dots}) == 1:
        return torch.stack(dots).tolist()
    return [float(d) for d in dots]


def hutchinson_trace(loss_fn: Callable[[Any], torch.Tensor], params: Mapping[str, torch.Tensor],
                     batches: Iterable | None = None, n_samples: int = 16, *,
                     generator: torch.Generator | None = None, distribution: str = "rademacher",
                     progress: bool = False) -> dict[str, TraceEstimate]:
    """Hutchinson estimate of ``tr(H_kk)`` for every block ``k`` of ``params``.

    Args:
        loss_fn: ``loss_fn(batch)`` returns the scalar loss of one batch, computed from
            ``params`` (e.g. a closure over the model).
        params: name -> leaf tensor with ``requires_grad=True`` (e.g. ``linear.weight``).
        batches: iterable of batches, consumed once; ``H`` is the Hessian of the mean of
            the per-batch losses. ``None`` calls ``loss_fn(None)`` once.
        n_samples: number of probe vectors (each one serves all blocks).
        generator: draws the per-probe seeds (the global RNG when ``None``); the same seed
            gives the same samples.
        distribution: ``"rademacher"`` (±1, lower variance) or ``"gaussian"``.
        progress: show a tqdm bar over Hessian-vector products.

    Returns:
        name -> :class:`TraceEstimate`, in the order of ``params``.

    Cost: per batch one forward, one backward with ``create_graph`` and ``n_samples`` double
    backwards; memory of the graph plus a few copies of ``params``.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise QBayesError(f"n_samples must be a positive integer, got {n_samples!r}")
    if distribution not in _DISTRIBUTIONS:
        raise QBayesError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
    names, tensors = _check_params(params)
    seed_device = generator.device if generator is not None else "cpu"
    seeds = torch.randint(0, 2**62, (n_samples,), generator=generator, device=seed_device).tolist()
    batches = _batch_list(batches)
    total = len(batches) * n_samples if hasattr(batches, "__len__") else None
    sums = [[0.0] * len(names) for _ in range(n_samples)]
    n_batches = 0
    with torch.enable_grad(), tqdm(total=total, desc="Hutchinson trace", unit="hvp", disable=not progress) as bar:
        for index, batch in enumerate(batches):
            grads = _gradients(loss_fn, names, tensors, batch, index)
            for k, seed in enumerate(seeds):
                vs = _probe(tensors, seed, distribution)
                for j, d in enumerate(_block_dots(vs, _hvp(grads, tensors, vs))):
                    sums[k][j] += d
                bar.update(1)
            del grads
            n_batches += 1
    if n_batches == 0:
        raise QBayesError("batches is empty: pass at least one batch, or None to call loss_fn(None) once")
    out = {}
    for j, (name, t) in enumerate(zip(names, tensors)):
        samples = [row[j] / n_batches for row in sums]
        mean = math.fsum(samples) / n_samples
        if n_samples > 1:
            var = math.fsum((s - mean) ** 2 for s in samples) / (n_samples - 1)
            se = math.sqrt(var / n_samples)
        else:
            se = math.nan
        out[name] = TraceEstimate(mean=mean, se=se, samples=samples, numel=t.numel())
    return out


def _diag_block(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``diag(∂ grad / ∂ t)`` by Hessian-vector products with unit vectors, in chunks."""
    n = t.numel()
    if not grad.requires_grad:
        return torch.zeros(n, dtype=t.dtype, device=t.device)
    g = grad.reshape(-1)
    diag = torch.empty(n, dtype=t.dtype, device=t.device)
    chunk = max(1, min(n, 2**20 // n))
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        units = torch.zeros(b - a, n, dtype=g.dtype, device=g.device)
        units[torch.arange(b - a), torch.arange(a, b)] = 1
        try:
            rows, = torch.autograd.grad(g, t, grad_outputs=units, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
            rows = torch.zeros_like(units) if rows is None else rows.reshape(b - a, n)
        except RuntimeError:  # an op without a batching rule: one double backward per entry
            rows = torch.zeros_like(units)
            for r, u in enumerate(units):
                row, = torch.autograd.grad(g, t, grad_outputs=u, retain_graph=True, allow_unused=True)
                if row is not None:
                    rows[r] = row.reshape(-1)
        diag[a:b] = rows[torch.arange(b - a), torch.arange(a, b)]
    return diag


def exact_block_traces(loss_fn: Callable[[Any], torch.Tensor], params: Mapping[str, torch.Tensor],
                       batches: Iterable | None = None) -> dict[str, float]:
    """Exact ``tr(H_kk) = Σ_{i∈k} ∂²L/∂θ_i²`` per block, for small models and reference checks.

    Same arguments and Hessian (of the batch-mean loss) as :func:`hutchinson_trace`; each
    diagonal entry costs a double backward (batched when autograd allows), so blocks are
    limited to 20000 entries.
    """
    names, tensors = _check_params(params)
    big = [f"{n} ({t.numel()})" for n, t in zip(names, tensors) if t.numel() > _MAX_EXACT_ENTRIES]
    if big:
        raise QBayesError(f"exact_block_traces is for small models: blocks {big} exceed "
                          f"{_MAX_EXACT_ENTRIES} entries; use hutchinson_trace")
    sums = [0.0] * len(names)
    n_batches = 0
    with torch.enable_grad():
        for index, batch in enumerate(_batch_list(batches)):
            grads = _gradients(loss_fn, names, tensors, batch, index)
            for j, (g, t) in enumerate(zip(grads, tensors)):
                sums[j] += float(_diag_block(g, t).sum(dtype=torch.float64))
            del grads
            n_batches += 1
    if n_batches == 0:
        raise QBayesError("batches is empty: pass at least one batch, or None to call loss_fn(None) once")
    return {name: s / n_batches for name, s in zip(names, sums)}
