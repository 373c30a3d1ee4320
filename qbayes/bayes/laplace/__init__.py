r"""The Laplace approximation: a Gaussian posterior at the MAP (MacKay 1992; Daxberger et al. 2021).

.. math:: p(\theta \mid D) \approx N\big(\theta_*,\ (sH + \lambda I)^{-1}\big), \qquad
          \log p(D) \approx \log p(D \mid \theta_*) - \tfrac{\lambda}{2}\|\theta_*\|^2
          + \tfrac{P}{2}\log\lambda - \tfrac12 \log\det(sH + \lambda I),

with :math:`H` the GGN (or empirical Fisher) of the log-likelihood at :math:`\theta_*`, prior
:math:`N(0, \lambda^{-1} I)`, and :math:`s = 1/\sigma^2` for Gaussian regression (1 for
classification). Predictions use the linearised network (GLM predictive, Immer et al. 2021):
:math:`f(x) \sim N(f_*(x), J P^{-1} J^\top)`, through the probit approximation
:math:`\mathrm{softmax}(f_* / \sqrt{1 + \tfrac{\pi}{8}\mathrm{diag}\,\Sigma_f})` or Monte Carlo,
or sample networks directly (``pred_type="nn"``).

``Laplace(model, likelihood, subset="all"|"last_layer", structure="diag"|"kron"|"full")``:
``kron`` gathers its factors with :func:`qbayes.curvature.collect`, the collector the weight
solvers' layer statistic comes from, so its input factor is the quantization path's ``H / 2``.
The model is a plain module called as ``model(x)`` on ``(x, y)`` batches; for ``kron`` it may
also be a :class:`qbayes.models.ModelAdapter` of any family.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...curvature import collect, ef_batch, flatten, ggn_batch, jacobians, mc_fisher_batch, unflatten
from ...curvature.kron import KronFactors
from ...errors import QBayesError
from ...models.adapter import ModelAdapter
from ...models.module import ModuleAdapter
from .structures import DiagStructure, FullStructure, KronStructure

STRUCTURES = ("diag", "kron", "full")


class Laplace:
    def __init__(self, model: nn.Module, likelihood: str, subset: str = "all", structure: str = "kron",
                 prior_precision: float = 1.0, sigma_noise: float = 1.0, fisher: str = "ggn"):
        if likelihood not in ("classification", "regression"):
            raise QBayesError(f"likelihood must be 'classification' or 'regression', not {likelihood!r}")
        if subset not in ("all", "last_layer"):
            raise QBayesError(f"subset must be 'all' or 'last_layer', not {subset!r}")
        if structure not in STRUCTURES:
            raise QBayesError(f"structure must be one of {STRUCTURES}, not {structure!r}")
        if fisher not in ("ggn", "ef", "mc"):
            raise QBayesError(f"fisher must be 'ggn', 'ef' or 'mc' (GGN from sampled labels), not {fisher!r}")
        if isinstance(model, ModelAdapter):
            if structure != "kron":
                raise QBayesError("a model adapter works with structure='kron'; pass the plain module for 'diag'/'full'")
            self.adapter, model = model, model.model
        else:
            self.adapter = ModuleAdapter(model, likelihood)
        self.model, self.likelihood, self.subset, self.structure_name, self.fisher = model, likelihood, subset, structure, fisher
        self.prior_precision = float(prior_precision)
        self.sigma_noise = float(sigma_noise)
        for what, v in (("prior_precision", self.prior_precision), ("sigma_noise", self.sigma_noise)):
            if not (math.isfinite(v) and v > 0):
                raise QBayesError(f"{what} must be a positive finite number, not {v!r}")
        if subset == "last_layer":
            linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise QBayesError("last-layer Laplace needs the model to end in an nn.Linear layer")
            self.last_name, self.last = linears[-1]
            self.params = {_join(self.last_name, k): v for k, v in self.last.named_parameters()}
        else:
            self.params = {k: v for k, v in model.named_parameters() if v.requires_grad}
        self.structure = None

    # ----------------------------------------------------------------- fitting
    def _features(self, x):
        """Inputs of the last layer (last-layer subset)."""
        box = {}
        h = self.last.register_forward_hook(lambda m, a, o: box.__setitem__("phi", a[0].detach()))
        try:
            self.model(x)
        finally:
            h.remove()
        return box["phi"]

    def _fn(self):
        """``fn(params, x_single) -> outputs (C,)`` over the random parameters only."""
        if self.subset == "last_layer":
            names = {k: k.rsplit(".", 1)[-1] for k in self.params}
            return lambda p, phi: torch.func.functional_call(self.last, {names[k]: v for k, v in p.items()}, (phi,))
        frozen = {k: v.detach() for k, v in self.model.named_parameters() if k not in self.params}
        return lambda p, x: torch.func.functional_call(self.model, {**frozen, **p}, (x.unsqueeze(0),)).squeeze(0)

    def _inputs(self, x):
        return self._features(x) if self.subset == "last_layer" else x

    @torch.no_grad()
    def _outputs(self, x):
        return self.model(x)

    def fit(self, loader) -> "Laplace":
        """Curvature and log-likelihood at the current parameters (taken as the MAP), in one pass
        over ``loader`` (a one-shot generator of ``(x, y)`` batches is fine)."""
        self.model.eval()
        self.mean = flatten({k: v.detach() for k, v in self.params.items()}).double()
        self.n_data, self._ll, self._sse = 0, 0.0, 0.0
        if self.structure_name == "kron":
            return self._fit_kron(loader)
        p = {k: v.detach() for k, v in self.params.items()}
        fn = self._fn()
        gen = torch.Generator().manual_seed(0)
        acc = None
        for x, y in loader:
            f = self._outputs(x)
            self.n_data += x.shape[0]
            if self.likelihood == "classification":
                self._ll += float(-nn.functional.cross_entropy(f, y, reduction="sum"))
            else:
                self._sse += float(((f - y.reshape(f.shape)) ** 2).sum())
            inp = self._inputs(x)
            if self.fisher == "ggn":
                c = ggn_batch(fn, p, inp, self.likelihood, self.structure_name)
            elif self.fisher == "mc":
                c = mc_fisher_batch(fn, p, inp, self.likelihood, self.structure_name, gen)
            else:
                c = ef_batch(fn, p, inp, y, self.likelihood, self.structure_name)
            acc = c.double() if acc is None else acc + c.double()
        if self.n_data == 0:
            raise QBayesError("Laplace.fit got an empty data loader")
        self.structure = FullStructure(acc) if self.structure_name == "full" else DiagStructure(acc)
        self.n_outputs = f.shape[1]
        return self

    def _fit_kron(self, loader) -> "Laplace":
        layers = self._kron_layers()
        fisher = {"ggn": "exact", "mc": "mc", "ef": "ef"}[self.fisher]
        try:
            col = collect(self.adapter, layers, loader, want=("H", "G"), fisher=fisher, bias_column=True, nll=True,
                          dtype=torch.float64)
        except QBayesError as e:
            if "empty" in str(e):
                raise QBayesError("Laplace.fit got an empty data loader") from None
            raise
        self.n_data = col.n_samples
        if self.likelihood == "classification":
            self._ll = -col.nll
        else:
            self._sse = 2 * col.nll  # the unit-noise negative log-likelihood is half the squared error
        factors = {n: KronFactors(A=col[n].A, G=col[n].G, n=col.n_rows, bias=m.bias is not None)
                   for n, m in layers.items()}
        self.structure = KronStructure(factors, self._layout(layers))
        self.n_outputs = col.n_outputs
        return self

    def _kron_layers(self) -> dict[str, nn.Linear]:
        if self.subset == "last_layer":
            return {self.last_name: self.last}
        mods = dict(self.model.named_modules())
        owners = {k.rsplit(".", 1)[0] if "." in k else "" for k in self.params}
        bad = [o for o in owners if not isinstance(mods[o], nn.Linear)]
        if bad:
            raise QBayesError(f"structure='kron' supports nn.Linear layers only; {bad} are not (use 'diag')")
        return {o: mods[o] for o in owners}

    def _layout(self, layers):
        offsets, i = {}, 0
        for k, v in self.params.items():
            offsets[k] = slice(i, i + v.numel())
            i += v.numel()
        return {n: (offsets[_join(n, "weight")], offsets.get(_join(n, "bias")), m.out_features,
                    m.in_features + (m.bias is not None)) for n, m in layers.items()}

    # ----------------------------------------------------------- marginal likelihood
    def _scale(self, sigma):
        return 1.0 / sigma**2 if self.likelihood == "regression" else torch.ones((), dtype=torch.float64)

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None) -> torch.Tensor:
        """Laplace estimate of ``log p(D)``; differentiable in both hyperparameters."""
        self._check_fitted()
        lam = torch.as_tensor(self.prior_precision if prior_precision is None else prior_precision, dtype=torch.float64)
        sig = torch.as_tensor(self.sigma_noise if sigma_noise is None else sigma_noise, dtype=torch.float64)
        if self.likelihood == "classification":
            ll = torch.tensor(self._ll, dtype=torch.float64)
        else:
            ll = -0.5 * self.n_data * torch.log(2 * math.pi * sig**2) - 0.5 * self._sse / sig**2
        P = self.mean.numel()
        return ll - 0.5 * lam * (self.mean**2).sum() + 0.5 * P * torch.log(lam) - 0.5 * self.structure.logdet(lam, self._scale(sig))

    def optimize_prior_precision(self, steps: int = 300, lr: float = 0.05, tune_sigma: bool | None = None) -> "Laplace":
        """Maximise the marginal likelihood over ``log λ`` (and ``log σ`` for regression)."""
        self._check_fitted()
        tune_sigma = self.likelihood == "regression" if tune_sigma is None else tune_sigma
        log_lam = torch.tensor(math.log(self.prior_precision), dtype=torch.float64, requires_grad=True)
        log_sig = torch.tensor(math.log(self.sigma_noise), dtype=torch.float64, requires_grad=tune_sigma)
        opt = torch.optim.Adam([log_lam] + ([log_sig] if tune_sigma else []), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = -self.log_marginal_likelihood(log_lam.exp(), log_sig.exp())
            loss.backward()
            opt.step()
        self.prior_precision, self.sigma_noise = float(log_lam.detach().exp()), float(log_sig.detach().exp())
        return self

    # -------------------------------------------------------------------- posterior
    @property
    def posterior_covariance(self) -> torch.Tensor:
        self._check_fitted()
        return self.structure.covariance(torch.tensor(self.prior_precision, dtype=torch.float64),
                                         self._scale(torch.tensor(self.sigma_noise, dtype=torch.float64)))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` parameter vectors from the posterior, ``(n, P)``."""
        self._check_fitted()
        lam = torch.tensor(self.prior_precision, dtype=torch.float64)
        s = self._scale(torch.tensor(self.sigma_noise, dtype=torch.float64))
        return self.mean + self.structure.sample(n, lam, s, generator)

    def functional_variance(self, x: torch.Tensor) -> torch.Tensor:
        """``J Σ Jᵀ`` of the linearised network at inputs ``x``: ``(n, C, C)``."""
        self._check_fitted()
        p = {k: v.detach() for k, v in self.params.items()}
        J = jacobians(self._fn(), p, self._inputs(x))
        lam = torch.tensor(self.prior_precision, dtype=torch.float64)
        return self.structure.functional_var(J, lam, self._scale(torch.tensor(self.sigma_noise, dtype=torch.float64)))

    @torch.no_grad()
    def predictive(self, x: torch.Tensor, pred_type: str = "glm", link_approx: str = "probit",
                   n_samples: int = 100, generator: torch.Generator | None = None):
        """Classification: class probabilities ``(n, C)``. Regression: ``(mean, variance)`` of
        ``y`` (the functional variance plus ``σ²``)."""
        self._check_fitted()
        f = self._outputs(x).double()
        if pred_type == "nn":
            inp = self._inputs(x)
            outs = [self._call_with(v, inp).double() for v in self.sample(n_samples, generator)]
            if self.likelihood == "classification":
                return torch.stack([torch.softmax(o, -1) for o in outs]).mean(0)
            o = torch.stack(outs)
            return o.mean(0), o.var(0, unbiased=False) + self.sigma_noise**2
        if pred_type != "glm":
            raise QBayesError(f"pred_type must be 'glm' or 'nn', not {pred_type!r}")
        if link_approx == "mc" and self.likelihood == "classification":
            return torch.softmax(self._linearised_samples(x, f, n_samples, generator), -1).mean(0)
        with torch.enable_grad():
            V = self.functional_variance(x)
        if self.likelihood == "regression":
            return f, torch.diagonal(V, dim1=1, dim2=2) + self.sigma_noise**2
        if link_approx == "probit":
            kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(V, dim1=1, dim2=2))
            return torch.softmax(f * kappa, -1)
        raise QBayesError(f"link_approx must be 'probit' or 'mc', not {link_approx!r}")

    def _linearised_samples(self, x, f, n_samples, generator):
        """Outputs of the linearised network ``f + J δ`` for posterior draws ``δ``, each by one
        forward-mode product (no Jacobian is formed): ``(n_samples, n, C)``."""
        p = {k: v.detach() for k, v in self.params.items()}
        inp = self._inputs(x)
        if self.subset == "last_layer":
            names = {k: k.rsplit(".", 1)[-1] for k in p}
            call = lambda q: torch.func.functional_call(self.last, {names[k]: v for k, v in q.items()}, (inp,))
        else:
            call = lambda q: torch.func.functional_call(self.model, q, (inp,))
        deltas = self.sample(n_samples, generator) - self.mean
        out = []
        for d in deltas:
            tangent = {k: v.to(p[k].dtype) for k, v in unflatten(d, p).items()}
            out.append(f + torch.func.jvp(call, (p,), (tangent,))[1].double())
        return torch.stack(out)

    def _call_with(self, vec: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Outputs with the random parameters set to ``vec`` (``inp``: features for last-layer)."""
        sampled = unflatten(vec.to(next(iter(self.params.values())).dtype), self.params)
        if self.subset == "last_layer":
            names = {k: k.rsplit(".", 1)[-1] for k in sampled}
            return torch.func.functional_call(self.last, {names[k]: v for k, v in sampled.items()}, (inp,))
        return torch.func.functional_call(self.model, sampled, (inp,))

    def _check_fitted(self):
        if self.structure is None:
            raise QBayesError("call Laplace.fit(loader) first")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
