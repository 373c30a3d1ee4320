r"""Per-layer curvature statistics of a causal LM, in one pass over a sensitivity set.

For a linear layer ``y = W x`` inside a language model with mean next-token loss
:math:`L = \frac1N \sum_t \ell_t`, write :math:`\delta_s = \partial(\sum_t \ell_t)/\partial y_s`
for the output gradient at position ``s``. Treating the per-position terms
:math:`\delta_s x_s^\top` as the samples of the gradient (the usual approximation for sequence
models: K-FAC for LMs, FIMA-Q, HAWQ's Fisher variants), the pass accumulates

* ``H = (2/N) Σ_s x_s x_sᵀ``: the layer-input second moment of :class:`InputSecondMoment` (GPTQ's
  Hessian; ``A = H/2`` is K-FAC's input factor);
* ``ef_diag = (1/N) Σ_s δ_s² (x_s²)ᵀ``: the diagonal empirical Fisher of ``L`` (observed labels);
* ``ggn_diag``: the same with labels sampled from the model's own predictive (a one-sample
  Monte Carlo estimate of the diagonal GGN, whose expectation is exact for softmax
  cross-entropy);
* ``G = (1/N) Σ_s δ̃_s δ̃_sᵀ``: K-FAC's output factor from the sampled labels, so that the GGN
  block of ``L`` is approximately ``G ⊗ A`` (row-major ``vec W``).

All of it reuses :class:`qbayes.curvature.InputSecondMoment` for the running second moments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..curvature import InputSecondMoment
from ..errors import CalibrationError


@dataclass
class LayerStats:
    H: torch.Tensor          # (in, in)  2/N Σ x xᵀ
    G: torch.Tensor          # (out, out) 1/N Σ δ̃ δ̃ᵀ (sampled labels)
    ef_diag: torch.Tensor    # (out, in) diagonal empirical Fisher of the mean loss
    ggn_diag: torch.Tensor   # (out, in) diagonal MC-GGN of the mean loss
    n_tokens: int


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]``."""
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    return nn.functional.cross_entropy(_at_least_f32(lg), ids[:, 1:].reshape(-1), reduction=reduction)


def _at_least_f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def check_batches(batches) -> list[torch.Tensor]:
    batches = [b for b in batches if b.numel()]
    if not batches:
        raise CalibrationError("the sensitivity set is empty: pass at least one window of token ids")
    for b in batches:
        if b.dim() != 2 or b.shape[1] < 2 or b.dtype not in (torch.int64, torch.int32):
            raise CalibrationError("sensitivity batches must be integer token ids of shape (batch, seqlen >= 2)")
    return batches


def collect_layer_stats(model: nn.Module, layers: Mapping[str, nn.Linear], batches: Iterable[torch.Tensor],
                        *, seed: int = 0, progress: bool = True) -> dict[str, LayerStats]:
    """Run ``model`` over ``batches`` of token ids and return :class:`LayerStats` per layer."""
    batches = check_batches(batches)
    gen = torch.Generator(device=batches[0].device).manual_seed(seed)
    acc_H = {n: InputSecondMoment(m.in_features, device=m.weight.device) for n, m in layers.items()}
    acc_G = {n: InputSecondMoment(m.out_features, device=m.weight.device) for n, m in layers.items()}
    ef = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers.items()}
    ggn = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers.items()}
    xs: dict[str, torch.Tensor] = {}
    ys: dict[str, torch.Tensor] = {}

    def hook(name):
        def fwd(_mod, args, out):
            xs[name] = args[0].detach()
            ys[name] = out
        return fwd

    hooks = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    names = list(layers)
    n_tok = 0
    rep: dict[str, str] | None = None
    try:
        for ids in tqdm(batches, desc="curvature statistics", unit="batch", disable=not progress):
            with torch.enable_grad():
                with _InputGrad(model):
                    logits = model(input_ids=ids, use_cache=False).logits
                    loss = next_token_loss(logits, ids, "sum")
                    probs = torch.softmax(_at_least_f32(logits[:, :-1].detach()), -1)
                    sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(ids.shape[0], -1)
                    loss_mc = next_token_loss(logits, torch.cat([ids[:, :1], sampled], 1), "sum")
                    outs = [ys[n] for n in names]
                    d_true = torch.autograd.grad(loss, outs, retain_graph=True)
                    d_mc = torch.autograd.grad(loss_mc, outs)
            if rep is None:  # q/k/v (and gate/up) read one input tensor: one H for all of them
                first_of: dict[int, str] = {}
                rep = {n: first_of.setdefault(xs[n].data_ptr(), n) for n in names}
            for n, dt, dm in zip(names, d_true, d_mc):
                x = xs[n].reshape(-1, xs[n].shape[-1]).float()
                dt = dt.reshape(-1, dt.shape[-1]).float()
                dm = dm.reshape(-1, dm.shape[-1]).float()
                if rep[n] == n:
                    acc_H[n].update(x)
                x2 = x * x
                ef[n].add_(dt.square().T @ x2)
                ggn[n].add_(dm.square().T @ x2)
                acc_G[n].update(dm)
            n_tok += ids.shape[0] * (ids.shape[1] - 1)
            xs.clear()
            ys.clear()
    finally:
        for h in hooks:
            h.remove()
    # H and G are means over the rows they saw (every position, including the last one, whose
    # output gradient is zero for x but not for the factors' row count); rescale G to 1/N.
    return {n: LayerStats(H=acc_H[rep[n]].H, G=acc_G[n].H / 2 * (acc_G[n].n / n_tok),
                          ef_diag=ef[n] / n_tok, ggn_diag=ggn[n] / n_tok, n_tokens=n_tok) for n in names}


class _InputGrad:
    """Make the embedding output require grad, so output gradients exist even when the
    parameters do not require grad (and no parameter gradient is ever computed)."""

    def __init__(self, model: nn.Module):
        self.emb = model.get_input_embeddings()
        self.h = None

    def __enter__(self):
        self.h = self.emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
        return self

    def __exit__(self, *exc):
        self.h.remove()
