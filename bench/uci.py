r"""The UCI regression benchmark (Hernández-Lobato & Adams 2015; Gal & Ghahramani 2016).

Five data sets (boston, concrete, energy, wine, yacht), their standard 20 random 90/10 splits, a
one-hidden-layer ReLU network of 50 units trained on the normalised data, and test RMSE and test
log-likelihood reported in the original units of the target. Methods:

* ``map``: Adam on the negative log posterior, a Gaussian likelihood whose noise std is learned
  jointly with the weights and a Gaussian prior ``N(0, 1/λ₀)`` (weight decay); the number of
  epochs is chosen by early stopping on a validation part carved from the training set, then the
  network is refitted on the whole training set for that many epochs. Predictive ``N(f(x), σ²)``.
* ``laplace``: a full-covariance GGN Laplace posterior at that MAP over all parameters; prior
  precision and noise std maximise the Laplace marginal likelihood (MacKay 1992; Immer et al.
  2021); GLM (linearised) predictive ``N(f(x), J Σ Jᵀ + σ²)``.
* ``sghmc``: SGHMC (Chen et al. 2014) from the MAP with the prior precision and noise std of the
  Laplace evidence (empirical Bayes), mini-batch gradients scaled by N/B; the predictive is the
  mixture over the thinned samples, ``log mean_s N(y | f_s(x), σ²)``.
* ``mfvi``: Bayes by Backprop with the local reparameterisation trick (Blundell et al. 2015;
  Kingma et al. 2015), means initialised at the MAP, prior ``N(0, 1/λ)`` with the Laplace
  evidence's ``λ``, learned noise std; predictive mixture over Monte Carlo forward passes.

Every hyperparameter is in :class:`Config`, chosen once for all data sets (on the
``--holdout`` mode, which scores on a validation part of the training set and never looks at
the test rows), and written into the protocol block of the results.

    python bench/uci.py                              # all sets, 20 splits: bench/results/uci.{json,md}
    python bench/uci.py --datasets yacht --splits 2  # a quick look (results not written)

Parallelism: two worker processes with one torch thread each (the 2-core budget). For a network
this small every op is tiny, and on a busy 2-core machine two intra-op threads in one process were
measured 5-50x slower than one (a 350x350 ``eigh`` took 5 s instead of milliseconds).
"""
from __future__ import annotations

import argparse
import copy
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from qbayes.bayes import bbb, sgmcmc
from qbayes.bayes.base import model_log_posterior
from qbayes.bayes.laplace import Laplace
from qbayes.bayes.metrics import gaussian_nll, rmse
from qbayes.bayes.trace import Trace
from qbayes.bayes.vbll import VBLLNet, VBLLRegression
from qbayes.data.uci import load_uci_split, n_splits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uci_report import METHODS, write  # noqa: E402  (bench/ is not a package)

DATASETS = ("boston", "concrete", "energy", "wine", "yacht")
# Gal & Ghahramani (2016), as tabulated in Table 1 of Lakshminarayanan et al. (2017): (RMSE, test LL)


@dataclass(frozen=True)
class Config:
    hidden: int = 50
    # MAP: full-batch Adam on  mean_i -log N(y_i | f(x_i), σ²) + λ₀/(2N) ||θ||²
    map_prior_precision: float = 10.0
    map_lr: float = 3e-3
    map_batch: int = 0                 # 0 = full batch (one step per epoch)
    map_max_epochs: int = 3000
    map_eval_every: int = 10
    map_patience: int = 500            # stop when the validation NLL has not improved for this many epochs
    map_val_fraction: float = 0.1      # early-stopping part carved from the training set
    map_sigma_init: float = 1.0
    # Laplace
    la_structure: str = "full"
    la_steps: int = 1000
    la_lr: float = 0.05
    # SGHMC (see run_sghmc): step ε, friction per step εα
    sghmc_step: float = 0.5
    sghmc_friction: float = 0.01
    sghmc_batch: int = 0
    sghmc_burnin: int = 500
    sghmc_samples: int = 75
    sghmc_thin: int = 20
    # MFVI
    mfvi_lr: float = 1e-2              # Adam on the means
    mfvi_lr_scale: float = 1e-2        # Adam on the posterior and noise scales (ρ, log σ)
    mfvi_batch: int = 0
    mfvi_epochs: int = 1000
    mfvi_init_sd: float = 1e-3
    mfvi_samples: int = 100
    # VBLL: head on the MAP's hidden features (+ a constant), prior N(0, 1/λ) with the Laplace λ
    vbll_train_features: bool = True
    vbll_learn_noise: bool = False      # noise fixed at the Laplace evidence estimate
    vbll_lr: float = 1e-3
    vbll_epochs: int = 500
    vbll_init_sd: float = 0.01
    dtype: str = "float64"


@dataclass
class Data:
    """Normalised training rows, normalised test inputs, test targets in original units."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_mean: float
    y_std: float


def load(name: str, split: int, holdout: bool = False, dtype=torch.float64) -> Data:
    """Split ``split`` of ``name``; with ``holdout`` a fixed random 10% of the
    training rows play the test set (for choosing hyperparameters without the test rows)."""
    s = load_uci_split(name, split)
    x, y, xt, yt = s.x_train_n, s.y_train_n, s.x_test_n, s.y_test
    if holdout:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + split))
        n_val = max(1, round(0.1 * len(x)))
        te, tr = perm[:n_val], perm[n_val:]
        xt, yt = x[te], s.y_train[te]
        x, y = x[tr], y[tr]
    return Data(x.to(dtype), y.to(dtype), xt.to(dtype), yt.to(dtype), float(s.y_mean), float(s.y_std))


def make_net(d: int, hidden: int, dtype) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1)).to(dtype)


def _batches(n: int, batch: int, gen: torch.Generator):
    """Index tensors of one epoch (the whole set when ``batch`` is 0 or >= n)."""
    if batch <= 0 or batch >= n:
        yield slice(None)
        return
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch):
        yield perm[i:i + batch]


def _gauss_nll(f, y, log_sigma):
    return 0.5 * ((y - f) ** 2 * torch.exp(-2 * log_sigma) + 2 * log_sigma + math.log(2 * math.pi))


# ---------------------------------------------------------------------------------------- MAP
def _train_map(x, y, cfg: Config, epochs: int, seed: int, x_val=None, y_val=None):
    """Adam on the negative log posterior with a learned noise std. With validation data, also
    returns the epoch count at which the validation NLL (predictive N(f, σ²)) was lowest."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = make_net(x.shape[1], cfg.hidden, x.dtype)
    log_sigma = nn.Parameter(torch.tensor(math.log(cfg.map_sigma_init), dtype=x.dtype))
    opt = torch.optim.Adam([*net.parameters(), log_sigma], lr=cfg.map_lr)
    n = len(x)
    best, best_epoch = float("inf"), epochs
    for epoch in range(1, epochs + 1):
        for idx in _batches(n, cfg.map_batch, gen):
            xb, yb = x[idx], y[idx]
            opt.zero_grad()
            nll = _gauss_nll(net(xb).squeeze(-1), yb, log_sigma).mean()
            prior = 0.5 * cfg.map_prior_precision * sum((p**2).sum() for p in net.parameters()) / n
            (nll + prior).backward()
            opt.step()
        if x_val is not None and epoch % cfg.map_eval_every == 0:
            with torch.no_grad():
                v = float(_gauss_nll(net(x_val).squeeze(-1), y_val, log_sigma).mean())
            if v < best:
                best, best_epoch = v, epoch
            elif epoch - best_epoch >= cfg.map_patience:
                break
    return net, log_sigma.detach(), best_epoch


def fit_map(d: Data, cfg: Config, seed: int):
    """Early stopping on a carved validation part, then a refit on all training rows."""
    n = len(d.x)
    epochs = cfg.map_max_epochs
    if cfg.map_val_fraction > 0:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(cfg.map_val_fraction * n))
        va, tr = perm[:n_val], perm[n_val:]
        _, _, epochs = _train_map(d.x[tr], d.y[tr], cfg, cfg.map_max_epochs, seed, d.x[va], d.y[va])
    net, log_sigma, _ = _train_map(d.x, d.y, cfg, epochs, seed)
    return net.eval(), float(log_sigma.exp()), epochs


# ------------------------------------------------------------------------------------ scoring
def score_gaussian(d: Data, mean_n: torch.Tensor, var_n: torch.Tensor) -> dict:
    """RMSE and test LL in original units of a Gaussian predictive on the normalised scale."""
    mean = mean_n.reshape(-1) * d.y_std + d.y_mean
    var = var_n.reshape(-1) * d.y_std**2
    return {"rmse": rmse(mean, d.y_test), "test_ll": -gaussian_nll(mean, var, d.y_test)}


def score_mixture(d: Data, means_n: torch.Tensor, vars_n: torch.Tensor) -> dict:
    """RMSE of the mixture mean and test LL ``mean_i log mean_s N(y_i | μ_si, v_si)`` for
    ``(S, n)`` sample means and variances on the normalised scale."""
    mu = means_n.double() * d.y_std + d.y_mean
    var = (vars_n.double() * d.y_std**2).expand_as(mu)
    y = d.y_test.double().reshape(1, -1)
    logp = -0.5 * (math.log(2 * math.pi) + var.log() + (y - mu) ** 2 / var)
    ll = torch.logsumexp(logp, 0) - math.log(mu.shape[0])
    return {"rmse": rmse(mu.mean(0), d.y_test), "test_ll": float(ll.mean())}


# ------------------------------------------------------------------------------------ methods
def fit_laplace(net: nn.Module, sigma: float, d: Data, cfg: Config) -> Laplace:
    la = Laplace(net, "regression", subset="all", structure=cfg.la_structure,
                 prior_precision=cfg.map_prior_precision, sigma_noise=sigma)
    la.fit([(d.x[i:i + 256], d.y[i:i + 256]) for i in range(0, len(d.x), 256)])
    return la.optimize_prior_precision(steps=cfg.la_steps, lr=cfg.la_lr)


def run_sghmc(net, la: Laplace, d: Data, cfg: Config, seed: int) -> dict:
    """SGHMC from the MAP at the Laplace evidence's (λ, σ), step ``ε = sghmc_step / sqrt(λ_max)``
    with ``λ_max`` the largest eigenvalue of the Laplace posterior precision (the stiffest
    direction), friction per step ``εα = sghmc_friction``; mixture predictive over the trace."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(d.x)
    log_post = model_log_posterior(net, "regression", n, prior_precision=la.prior_precision,
                                   noise_std=la.sigma_noise)
    eps = cfg.sghmc_step * float(torch.linalg.eigvalsh(la.posterior_covariance).min().sqrt())
    t = sgmcmc.sghmc(log_post, lr=eps, alpha=cfg.sghmc_friction / eps)
    state = t.init({k: v.detach().clone() for k, v in net.named_parameters()})
    steps = cfg.sghmc_burnin + cfg.sghmc_samples * cfg.sghmc_thin
    trace = Trace(burnin=cfg.sghmc_burnin, thin=cfg.sghmc_thin, max_samples=cfg.sghmc_samples)
    while state.step < steps:
        for idx in _batches(n, cfg.sghmc_batch, gen):
            state = t.update(state, (d.x[idx], d.y[idx]), inplace=True)
            trace(state)
            if state.step >= steps:
                break
    with torch.no_grad():
        means = torch.stack([torch.func.functional_call(net, p, (d.x_test,)).squeeze(-1) for p in trace.samples])
    out = score_mixture(d, means, torch.tensor(la.sigma_noise**2, dtype=means.dtype))
    return {**out, "step_size": eps, "samples": len(trace)}


def run_mfvi(net, la: Laplace, d: Data, cfg: Config, seed: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(d.x)
    vi = bbb.to_mean_field(net, prior_std=la.prior_precision**-0.5, init_sd=cfg.mfvi_init_sd)
    log_sigma = nn.Parameter(torch.tensor(math.log(la.sigma_noise), dtype=d.x.dtype))
    rho = [p for k, p in vi.named_parameters() if k.endswith("_rho")]
    mu = [p for k, p in vi.named_parameters() if not k.endswith("_rho")]
    opt = torch.optim.Adam([{"params": mu}, {"params": [*rho, log_sigma], "lr": cfg.mfvi_lr_scale}], lr=cfg.mfvi_lr)
    bbb.set_sampling(vi, True)
    for _ in range(cfg.mfvi_epochs):
        for idx in _batches(n, cfg.mfvi_batch, gen):
            opt.zero_grad()
            bbb.elbo_loss(vi, d.x[idx], d.y[idx], n, "regression", noise_std=log_sigma.exp()).backward()
            opt.step()
    with torch.no_grad():
        means = torch.stack([vi(d.x_test).squeeze(-1) for _ in range(cfg.mfvi_samples)])
        sigma = float(log_sigma.exp())
    return {**score_mixture(d, means, torch.tensor(sigma**2, dtype=means.dtype)), "sigma": sigma}


class _AppendOne(nn.Module):
    """Features followed by a constant 1 (the VBLL head has no bias)."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x):
        h = self.features(x)
        return torch.cat([h, torch.ones_like(h[:, :1])], 1)


def run_vbll(net, la: Laplace, d: Data, cfg: Config, seed: int) -> dict:
    torch.manual_seed(seed)
    n = len(d.x)
    head = VBLLRegression(cfg.hidden + 1, 1, prior_scale=la.prior_precision**-0.5, init_sd=cfg.vbll_init_sd,
                          noise_std=la.sigma_noise, learn_noise=cfg.vbll_learn_noise)
    model = VBLLNet(_AppendOne(copy.deepcopy(net[:-1])), head).to(d.x.dtype)
    with torch.no_grad():
        head.W_mean.copy_(torch.cat([net[-1].weight, net[-1].bias[:, None]], 1))
    model.features.requires_grad_(cfg.vbll_train_features)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.vbll_lr)
    for _ in range(cfg.vbll_epochs):
        opt.zero_grad()
        model.loss(d.x, d.y, n).backward()
        opt.step()
    with torch.no_grad():
        mean, var = model.predict(d.x_test)
    return {**score_gaussian(d, mean, var), "sigma": float(head.log_noise.detach().exp())}


def run_split(name: str, split: int, methods=METHODS, cfg: Config = Config(), holdout: bool = False) -> dict:
    """All ``methods`` on one split: ``{method: {"rmse", "test_ll", "seconds", ...}}``."""
    dtype = getattr(torch, cfg.dtype)
    d = load(name, split, holdout, dtype)
    seed = 100 * split + 7
    out = {}
    t0 = time.perf_counter()
    net, sigma, epochs = fit_map(d, cfg, seed)
    with torch.no_grad():
        f = net(d.x_test).squeeze(-1)
    t_map = time.perf_counter() - t0
    if "map" in methods:
        out["map"] = {**score_gaussian(d, f, torch.full_like(f, sigma**2)), "sigma": sigma, "epochs": epochs,
                      "seconds": t_map}
    if not set(methods) & {"laplace", "sghmc", "mfvi", "vbll"}:
        return out
    t0 = time.perf_counter()
    la = fit_laplace(net, sigma, d, cfg)
    t_la = time.perf_counter() - t0
    if "laplace" in methods:
        mean, var = la.predictive(d.x_test)
        out["laplace"] = {**score_gaussian(d, mean, var), "sigma": la.sigma_noise,
                          "prior_precision": la.prior_precision, "seconds": t_map + t_la}
    for m, fn in (("sghmc", run_sghmc), ("mfvi", run_mfvi), ("vbll", run_vbll)):
        if m in methods:
            t0 = time.perf_counter()
            out[m] = {**fn(net, la, d, cfg, seed), "seconds": t_map + t_la + time.perf_counter() - t0}
    return out


# ------------------------------------------------------------------------------------ driver
def _task(args):
    ds, s, methods, cfg, holdout, threads = args
    torch.set_num_threads(threads)
    return ds, s, run_split(ds, s, methods, cfg, holdout)


def _mean_se(v: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)); NaN stays NaN."""
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), (float(t.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan"))


def summarise(runs: list[dict], datasets, methods) -> list[dict]:
    rows = []
    for ds in datasets:
        for m in methods:
            r = [x for x in runs if x["dataset"] == ds and x["method"] == m]
            if not r:
                continue
            rm, rs = _mean_se([x["rmse"] for x in r])
            lm, ls = _mean_se([x["test_ll"] for x in r])
            rows.append({"dataset": ds, "method": m, "rmse": rm, "rmse_se": rs, "test_ll": lm, "test_ll_se": ls})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--splits", type=int, default=None, help="first N splits only (default: all 20)")
    ap.add_argument("--holdout", action="store_true",
                    help="score on a validation part of the training rows (for tuning), not the test rows")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a Config field")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (one split each at a time)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config()
    for kv in args.set:
        k, v = kv.split("=", 1)
        cast = type(getattr(cfg, k))
        cfg = replace(cfg, **{k: (v.lower() in ("1", "true", "yes")) if cast is bool else cast(v)})
    full = args.splits is None and not args.holdout and set(args.datasets) == set(DATASETS) \
        and set(args.methods) == set(METHODS) and not args.set
    if not full:
        print("a partial or modified run: bench/results/uci.{json,md} are left as they are", flush=True)
    tasks = [(ds, s, tuple(args.methods), cfg, args.holdout, args.threads) for ds in args.datasets
             for s in range(n_splits(ds) if args.splits is None else min(args.splits, n_splits(ds)))]
    runs, t_start = [], time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for ds, s, res in pool.imap(_task, tasks):
            for m, r in res.items():
                runs.append({"dataset": ds, "split": s, "method": m, **r})
            print(f"[{time.perf_counter() - t_start:7.1f}s] {ds} split {s}: " + "  ".join(
                f"{m} ll {r['test_ll']:.3f} rmse {r['rmse']:.3f}" for m, r in res.items()), flush=True)
    total = time.perf_counter() - t_start
    rows = summarise(runs, args.datasets, args.methods)
    for r in rows:
        print(f"{r['dataset']:9s} {r['method']:8s} ll {r['test_ll']:7.3f} ± {r['test_ll_se']:.3f}   "
              f"rmse {r['rmse']:6.3f} ± {r['rmse_se']:.3f}")
    print(f"total {total:.0f} s")
    if full:
        write(rows, runs, cfg, total, args.workers, args.threads)


if __name__ == "__main__":
    main()
