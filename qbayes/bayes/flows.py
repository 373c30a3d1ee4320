r"""Variational inference with planar and radial normalizing flows (Rezende & Mohamed 2015).

A sample of the base distribution :math:`z_0 \sim q_0 = N(\mu, \mathrm{diag}\,\sigma^2)` (learnable
``mu`` and ``log_sigma``) is pushed through :math:`K` invertible maps,
:math:`z_K = f_K \circ \dots \circ f_1(z_0)`, and by the change of variables

.. math:: \log q_K(z_K) = \log q_0(z_0) - \sum_{k=1}^K \log\left|\det \frac{\partial f_k}{\partial z_{k-1}}\right|.

Layers (Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows", sec. 4 and A.1-A.2):

* planar, :math:`f(z) = z + \hat u\, h(w^\top z + b)`, :math:`h = \tanh`, with
  :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w/\|w\|^2`, :math:`m(x) = -1 + \mathrm{softplus}(x)`,
  so that :math:`w^\top \hat u = m(w^\top u) > -1` and the map is invertible;
  :math:`\log|\det| = \log|1 + \hat u^\top h'(w^\top z + b)\, w|`;
* radial, :math:`f(z) = z + \beta h(\alpha, r)(z - z_0)`, :math:`h = 1/(\alpha + r)`,
  :math:`r = \|z - z_0\|`, with :math:`\alpha = \mathrm{softplus}(\tilde\alpha) > 0` and
  :math:`\beta = -\alpha + \mathrm{softplus}(\tilde\beta) > -\alpha` (invertible);
  :math:`\log|\det| = (d-1)\log(1 + \beta h) + \log(1 + \beta h + \beta h' r)`, where
  :math:`1 + \beta h + \beta h' r = 1 + \beta\alpha h^2`.

Layer functions are pure functions of a parameter dict (they work under ``torch.func``); a flow's
``K`` layers are stored stacked, ``{"u": (K, d), "w": (K, d), "b": (K,)}`` (planar) or
``{"z0": (K, d), "alpha_raw": (K,), "beta_raw": (K,)}`` (radial), and the kind is read from the
keys. :func:`build` fits the flow to an unnormalised target :math:`\tilde p` by maximising

.. math:: \mathrm{ELBO} = E_{q_0}\Big[\log \tilde p(f_K(z_0)) - \log q_0(z_0)
          + \sum_k \log\left|\det \partial f_k / \partial z_{k-1}\right|\Big] \le \log Z,

estimated with reparameterised samples :math:`z_0 = \mu + \sigma \odot \varepsilon`, one Adam step
(Kingma & Ba 2015) per update; :math:`\log Z - \mathrm{ELBO} = \mathrm{KL}(q_K \,\|\, p)`.
:func:`sample` draws from a fitted flow with its log density and :func:`elbo` estimates the bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import QBayesError
from .base import Params, State, Transform, commit, scheduled

KINDS = ("planar", "radial")
PLANAR_KEYS = ("u", "w", "b")
RADIAL_KEYS = ("z0", "alpha_raw", "beta_raw")
LogDensity = Callable[[torch.Tensor], torch.Tensor]
Hyper = float | Callable[[int], float]
_LOG_E_MINUS_1 = math.log(math.e - 1.0)  # m(x) = 0 and softplus(x) = 1 at this x


def planar_u_hat(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    r""":math:`\hat u = u + (m(w^\top u) - w^\top u)\, w/\|w\|^2`; then :math:`w^\top\hat u > -1`."""
    wu = (w * u).sum(-1, keepdim=True)
    return u + (-1.0 + F.softplus(wu) - wu) * w / (w * w).sum(-1, keepdim=True)


def planar(layer: Params, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One planar layer on ``z`` of shape ``(..., d)``: ``(f(z), log|det df/dz|)``, the latter ``(...)``."""
    u, w, b = layer["u"], layer["w"], layer["b"]
    wu = (w * u).sum(-1)
    m = -1.0 + F.softplus(wu)  # = w·û exactly
    u_hat = u + ((m - wu) / (w * w).sum(-1)) * w
    h = torch.tanh(z @ w + b)
    return z + h.unsqueeze(-1) * u_hat, torch.log1p(m * (1.0 - h * h))


def radial(layer: Params, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One radial layer on ``z`` of shape ``(..., d)``: ``(f(z), log|det df/dz|)``, the latter ``(...)``."""
    alpha = F.softplus(layer["alpha_raw"])
    beta = -alpha + F.softplus(layer["beta_raw"])
    diff = z - layer["z0"]
    r = torch.linalg.vector_norm(diff, dim=-1)
    h = 1.0 / (alpha + r)
    bh = beta * h
    logdet = (z.shape[-1] - 1) * torch.log1p(bh) + torch.log1p(bh * alpha * h)
    return z + bh.unsqueeze(-1) * diff, logdet


def flow_kind(params: Params) -> str:
    """``"planar"`` or ``"radial"``, read from the keys of a (stacked) flow parameter dict."""
    if all(k in params for k in PLANAR_KEYS):
        return "planar"
    if all(k in params for k in RADIAL_KEYS):
        return "radial"
    raise QBayesError(f"flow parameters need keys {PLANAR_KEYS} (planar) or {RADIAL_KEYS} (radial); "
                      f"got {sorted(params)}. Create them with FlowSpec(kind, dim, n_layers).init().")


def flow(params: Params, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Push ``z`` ``(..., d)`` through all ``K`` stacked layers: ``(z_K, \sum_k log|det|)``.

    The same maps as :func:`planar` / :func:`radial` applied in turn, with the per-layer
    reparameterisations (:math:`\hat u`, :math:`\alpha`, :math:`\beta`) and the log-determinants
    computed for all layers at once (fewer, larger tensor operations: faster to differentiate).
    """
    kind = flow_kind(params)
    shape, d = z.shape, z.shape[-1]
    z = z.reshape(-1, d)
    hs = []
    if kind == "planar":
        u, w = params["u"], params["w"]
        wu = (w * u).sum(-1)
        m = -1.0 + F.softplus(wu)  # = w·û, one per layer
        u_hat = u + ((m - wu) / (w * w).sum(-1)).unsqueeze(-1) * w
        for w_k, b_k, u_k in zip(w.unbind(0), params["b"].unbind(0), u_hat.unbind(0)):
            h = torch.tanh(torch.addmv(b_k, z, w_k))  # h(w·z + b)
            z = torch.addr(z, h, u_k)  # z + h û
            hs.append(h)
        if hs:
            logdet = torch.log1p(m.unsqueeze(-1) * (1.0 - torch.stack(hs) ** 2)).sum(0)
    else:
        alpha = F.softplus(params["alpha_raw"])
        beta = -alpha + F.softplus(params["beta_raw"])
        for z0_k, a_k, b_k in zip(params["z0"].unbind(0), alpha.unbind(0), beta.unbind(0)):
            diff = z - z0_k
            h = 1.0 / (a_k + torch.linalg.vector_norm(diff, dim=-1))
            z = torch.addcmul(z, (b_k * h).unsqueeze(-1), diff)  # z + β h (z - z0)
            hs.append(h)
        if hs:
            H = torch.stack(hs)
            bh = beta.unsqueeze(-1) * H
            logdet = ((d - 1) * torch.log1p(bh) + torch.log1p(bh * alpha.unsqueeze(-1) * H)).sum(0)
    if not hs:
        logdet = z.new_zeros(z.shape[0])
    return z.reshape(shape), logdet.reshape(shape[:-1])


@dataclass(frozen=True)
class FlowSpec:
    """``n_layers`` layers of one ``kind`` (``"planar"`` or ``"radial"``) in ``dim`` dimensions.

    :meth:`init` starts every layer near the identity, so a deep flow starts as its base
    distribution: a planar layer gets ``w ~ N(0, I/d)``, ``b ~ N(0, 1)`` and
    ``u = log(e-1) w/||w||^2 + init_scale * N(0, I)`` (then ``û`` is of size ``init_scale``); a
    radial layer gets centre ``z0 ~ N(0, I)``, ``alpha_raw ~ init_scale * N(0, 1)`` and
    ``beta_raw = alpha_raw + init_scale * N(0, 1)`` (``beta`` = 0 when the noise is 0).
    """

    kind: str
    dim: int
    n_layers: int
    init_scale: float = 0.01

    def __post_init__(self):
        if self.kind not in KINDS:
            raise QBayesError(f"flow kind must be one of {KINDS}, not {self.kind!r}")
        if self.dim < 1 or self.n_layers < 0:
            raise QBayesError(f"a flow needs dim >= 1 and n_layers >= 0; got dim={self.dim}, "
                              f"n_layers={self.n_layers}")

    def init(self, seed: int = 0, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> Params:
        """Stacked initial layer parameters, drawn in float64 from ``torch.Generator().manual_seed(seed)``."""
        g = torch.Generator().manual_seed(seed)
        K, d, s = self.n_layers, self.dim, self.init_scale

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        if self.kind == "planar":
            w = randn(K, d) / math.sqrt(d)
            u = _LOG_E_MINUS_1 * w / (w * w).sum(-1, keepdim=True) + s * randn(K, d)
            params = {"u": u, "w": w, "b": randn(K)}
        else:
            a = s * randn(K)
            params = {"z0": randn(K, d), "alpha_raw": a, "beta_raw": a + s * randn(K)}
        return {k: v.to(dtype=dtype, device=device) for k, v in params.items()}


def _push(params: Params, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Base sample from standard noise and the flow: ``(z_K, log q_K(z_K))``."""
    log_sigma = params["log_sigma"]
    z = params["mu"] + torch.exp(log_sigma) * eps
    log_q0 = -0.5 * (eps * eps).sum(-1) - log_sigma.sum() - 0.5 * eps.shape[-1] * math.log(2 * math.pi)
    z, logdet = flow(params, z)
    return z, log_q0 - logdet


def _noise(batch, n: int, like: torch.Tensor) -> torch.Tensor:
    """Standard normal base noise ``(n, d)``: given as ``batch``, or drawn (from ``batch`` if a Generator)."""
    d = like.shape[-1]
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 2 or batch.shape[1] != d:
            raise QBayesError(f"a noise batch must have shape (n_samples, {d}), not {tuple(batch.shape)}")
        return batch.to(dtype=like.dtype, device=like.device)
    if batch is None or isinstance(batch, torch.Generator):
        return torch.randn(n, d, generator=batch, dtype=like.dtype, device=like.device)
    raise QBayesError(f"batch must be None, a torch.Generator or a noise tensor (n, {d}); got {type(batch).__name__}")


def _log_density(log_density: LogDensity, z: torch.Tensor) -> torch.Tensor:
    lp = log_density(z)
    if not isinstance(lp, torch.Tensor) or lp.shape != z.shape[:1]:
        raise QBayesError(f"log_density(z) must return one value per sample, shape ({z.shape[0]},); "
                          f"got {getattr(lp, 'shape', type(lp).__name__)}")
    return lp


def build(log_density: LogDensity, dim: int, n_layers: int, kind: str = "planar", lr: Hyper = 1e-3,
          n_samples: int = 64, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          anneal: Hyper = 1.0, init_scale: float = 0.01) -> Transform:
    r"""Normalizing-flow VI of ``log_density(z) -> log p̃(z)`` (``z`` of shape ``(n, dim)``, result ``(n,)``).

    The base is :math:`N(\mu, \mathrm{diag}\,\sigma^2)` with learnable ``mu`` and ``log_sigma``
    (``init`` starts them at 0: a standard normal) followed by ``n_layers`` layers of ``kind``.
    ``update(state, batch=None, inplace=False)`` takes one Adam step (moments ``extras["m"]``,
    ``extras["v"]``, bias-corrected; ``lr`` may be a function of the step) on the Monte Carlo
    negative ELBO with ``n_samples`` reparameterised samples. ``batch`` is the base noise: ``None``
    draws it from torch's global generator, a ``torch.Generator`` draws it from that one, and an
    ``(n, dim)`` tensor of standard normals is used as given. ``anneal`` (a constant or a function
    of the step, default 1: none) multiplies :math:`\log\tilde p` in the objective, the annealed
    free energy of Rezende & Mohamed (2015, sec. 6.1). ``state.log_posterior`` holds the
    un-annealed ELBO estimate of the step's samples (at the parameters before the step).
    """
    spec = FlowSpec(kind, dim, n_layers, init_scale)
    b1, b2 = betas
    if n_samples < 1:
        raise QBayesError(f"n_samples must be >= 1, not {n_samples}")

    def init(params: Params | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> State:
        """Start from ``params`` (``mu``, ``log_sigma`` and stacked layers) or a fresh seeded flow."""
        if params is None:
            params = {"mu": torch.zeros(dim, dtype=dtype, device=device),
                      "log_sigma": torch.zeros(dim, dtype=dtype, device=device),
                      **spec.init(seed, dtype, device)}
        missing = {"mu", "log_sigma", *(PLANAR_KEYS if kind == "planar" else RADIAL_KEYS)} - set(params)
        if missing:
            raise QBayesError(f"flow VI parameters lack {sorted(missing)}; call init() without params "
                              f"to create them")
        params = {k: v.detach().clone() for k, v in params.items()}
        return State(params=params, log_posterior=torch.tensor(float("nan")),
                     extras={"m": {k: torch.zeros_like(p) for k, p in params.items()},
                             "v": {k: torch.zeros_like(p) for k, p in params.items()}})

    def update(state: State, batch=None, inplace: bool = False) -> State:
        noise = _noise(batch, n_samples, state.params["mu"])
        t, a, e = state.step + 1, scheduled(anneal, state.step), scheduled(lr, state.step)
        leaves = {k: p.detach().requires_grad_(True) for k, p in state.params.items()}
        with torch.enable_grad():
            z, log_q = _push(leaves, noise)
            lp = _log_density(log_density, z)
            loss = (log_q - a * lp).mean()
            g = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
        grads = dict(zip(leaves, g))
        value = (lp - log_q).detach().mean()
        m = {k: b1 * state.extras["m"][k] + (1 - b1) * g for k, g in grads.items()}
        v = {k: b2 * state.extras["v"][k] + (1 - b2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - b1**t, 1 - b2**t
        new = {k: p - e * (m[k] / c1) / ((v[k] / c2).sqrt() + eps) for k, p in state.params.items()}
        return commit(state, inplace, new, log_posterior=value, step=t, extras={"m": m, "v": v})

    return Transform(init, update)


@torch.no_grad()
def sample(state: State | Params, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of the fitted flow and their log density: ``(z (n, d), log q(z) (n,))``."""
    params = state.params if isinstance(state, State) else state
    return _push(params, _noise(generator, n, params["mu"]))


@torch.no_grad()
def elbo(state: State | Params, log_density: LogDensity, n: int = 100_000,
         generator: torch.Generator | None = None, chunk: int = 100_000) -> float:
    r"""Monte Carlo :math:`E_q[\log\tilde p(z) - \log q(z)]` with ``n`` samples (in chunks), summed in float64."""
    if n < 1:
        raise QBayesError(f"n must be >= 1, not {n}")
    total = 0.0
    for start in range(0, n, chunk):
        z, log_q = sample(state, min(chunk, n - start), generator)
        total += float((_log_density(log_density, z) - log_q).double().sum())
    return total / n
