"""End-to-end recipes for classifiers: train a MAP network, fit a posterior, score it.

Used by ``qbayes uq`` and ``bench/calibration.py``. Every ``fit_*`` returns a function
``predict(x) -> class probabilities`` (batched by :func:`predict_probs`).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from . import bbb, metrics, schedules, sgmcmc
from .base import model_log_posterior
from .laplace import Laplace
from .trace import Trace, predictive
from .vbll import VBLLClassification, VBLLNet
from ..errors import QBayesError

log = logging.getLogger(__name__)
Predict = Callable[[torch.Tensor], torch.Tensor]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    idx = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        j = idx[i:i + batch_size]
        yield x[j], y[j]


def train_map(model: nn.Module, x, y, epochs: int = 5, lr: float = 1e-3, prior_precision: float = 30.0,
              batch_size: int = 128, seed: int = 0, progress: bool = True) -> nn.Module:
    """Adam on ``mean CE + λ/(2N) ||θ||²``: the MAP under the prior ``N(0, 1/λ)``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(x)
    model.train()
    for ep in range(epochs):
        bar = tqdm(list(batches(x, y, batch_size, True, g)), desc=f"MAP epoch {ep + 1}/{epochs}", disable=not progress)
        for xb, yb in bar:
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss = loss + prior_precision / (2 * n) * sum((p**2).sum() for p in model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def predict_probs(predict: Predict, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([predict(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def classification_metrics(probs: torch.Tensor, y: torch.Tensor, probs_ood: torch.Tensor | None = None) -> dict:
    out = {"acc": metrics.accuracy(probs, y), "nll": metrics.nll(probs, y), "ece": metrics.ece(probs, y),
           "brier": metrics.brier(probs, y)}
    if probs_ood is not None:
        out["ood_auroc"] = metrics.ood_auroc(probs, probs_ood)
    return out


def fit_map(model: nn.Module, *_args, **_kw) -> Predict:
    return lambda xb: torch.softmax(model(xb), -1)


def fit_laplace(model: nn.Module, x, y, subset: str = "last_layer", structure: str = "kron",
                prior_precision: float = 30.0, batch_size: int = 256, curvature_subset: int | None = None,
                link_approx: str = "probit", fisher: str = "ggn", n_samples: int = 20) -> tuple[Predict, Laplace]:
    """Laplace at the MAP with the prior precision tuned by marginal likelihood.

    ``curvature_subset`` estimates the curvature from that many training points, scaled to N
    (for full-network structures whose per-sample Jacobians are costly).
    """
    la = Laplace(model, "classification", subset=subset, structure=structure, prior_precision=prior_precision,
                 fisher=fisher)
    if curvature_subset and curvature_subset < len(x):
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(x), generator=g)[:curvature_subset]
        la.fit(list(batches(x[pick], y[pick], batch_size)))
        _scale_curvature(la, len(x) / curvature_subset)
    else:
        la.fit(list(batches(x, y, batch_size)))
    la.optimize_prior_precision()
    gen = torch.Generator().manual_seed(0)
    return (lambda xb: la.predictive(xb, link_approx=link_approx, n_samples=n_samples, generator=gen)), la


def _scale_curvature(la: Laplace, factor: float) -> None:
    s = la.structure
    if hasattr(s, "h"):
        s.h = s.h * factor
    elif hasattr(s, "eigvals"):
        s.eigvals = s.eigvals * factor
    else:
        s.blocks = [(nm, a, QA, g, QG, n * factor, lay) for nm, a, QA, g, QG, n, lay in s.blocks]
    la._ll *= factor
    la.n_data = int(la.n_data * factor)


def fit_sgmcmc(model: nn.Module, x, y, sampler: str = "sghmc", epochs: int = 4, cycles: int = 4,
               lr: float = 0.05, momentum: float = 0.9, prior_precision: float = 30.0, temperature: float = 1.0,
               samples_per_cycle: int = 3, batch_size: int = 128, seed: int = 0,
               progress: bool = True) -> tuple[Predict, Trace, float]:
    """Cyclical SG-MCMC from the current (MAP) weights; returns the predictive, the trace and steps/s.

    ``lr``/``momentum`` are SGD-equivalent values (see :func:`sgmcmc.sgd_equivalent`); the step
    follows a cosine cycle and samples are taken at the end of each cycle's sampling phase.
    """
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    cyc = schedules.Cyclical(lr, total, cycles, explore=0.8)
    log_post = model_log_posterior(model, "classification", n, prior_precision, temperature=1.0)
    if sampler == "sghmc":
        eps, alpha = sgmcmc.sgd_equivalent(cyc.lr, momentum, n)
        t = sgmcmc.sghmc(log_post, lr=eps, alpha=alpha, temperature=cyc.temperature(temperature))
    elif sampler == "sgld":
        t = sgmcmc.sgld(log_post, lr=lambda s: cyc.lr(s) / n, temperature=cyc.temperature(temperature))
    else:
        raise QBayesError(f"sampler must be 'sghmc' or 'sgld', not {sampler!r}")
    L = cyc.cycle_length
    spacing = max(1, int(L * (1 - cyc.explore)) // samples_per_cycle)

    def keep(st) -> bool:  # the last `samples_per_cycle` points of each sampling phase, `spacing` apart
        back = L - 1 - (st.step - 1) % L
        return cyc.sampling(st.step - 1) and back % spacing == 0 and back < spacing * samples_per_cycle

    trace = Trace(keep=keep)
    state = t.init({k: v.detach() for k, v in model.named_parameters()})
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"{sampler.upper()} (cyclical)", disable=not progress)
    while state.step < total:
        for xb, yb in batches(x, y, batch_size, True, g):
            if state.step >= total:
                break
            state = t.update(state, (xb, yb), inplace=True)
            trace(state)
            bar.update(1)
    bar.close()
    rate = total / (time.perf_counter() - t0)
    return (lambda xb: predictive(model, trace, xb)), trace, rate


def fit_mfvi(model: nn.Module, x, y, epochs: int = 2, lr: float = 1e-3, prior_precision: float = 30.0,
             n_samples: int = 16, batch_size: int = 128, seed: int = 0, progress: bool = True) -> Predict:
    """Bayes by Backprop (local reparameterisation) initialised at the MAP weights."""
    mf = bbb.to_mean_field(model, prior_std=1 / math.sqrt(prior_precision), init_sd=1e-3)
    opt = torch.optim.Adam(mf.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        for xb, yb in tqdm(list(batches(x, y, batch_size, True, g)), desc=f"MFVI epoch {ep + 1}/{epochs}", disable=not progress):
            loss = bbb.elbo_loss(mf, xb, yb, len(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
    mf.eval()
    return lambda xb: bbb.mc_predict(mf, xb, n_samples)


def fit_vbll(model: nn.Sequential, x, y, epochs: int = 2, lr: float = 1e-3, prior_scale: float = 1.0,
             batch_size: int = 128, seed: int = 0, progress: bool = True) -> Predict:
    """A VBLL classification head on the MAP features (head initialised from the MAP last layer),
    trained jointly with the features."""
    features = copy.deepcopy(model[:-1])
    last = model[-1]
    head = VBLLClassification(last.in_features, last.out_features, prior_scale=prior_scale, init_sd=0.01)
    with torch.no_grad():
        head.W_mean.copy_(last.weight)
    net = VBLLNet(features, head)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for ep in range(epochs):
        for xb, yb in tqdm(list(batches(x, y, batch_size, True, g)), desc=f"VBLL epoch {ep + 1}/{epochs}", disable=not progress):
            loss = net.loss(xb, yb, len(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return lambda xb: net.predict(xb)
