r"""One collector for every per-layer statistic: ``collect(adapter, layers, batches, want=...)``.

For a layer ``y = W x`` (a ``Conv2d`` is the same on its im2col patches ``x`` and the output
pixels ``y``) and the summed negative log-likelihood :math:`\mathcal L` of the model's
outputs, write :math:`\delta = \partial \mathcal L / \partial y` for the output gradient of
one row. One pass over the batches gathers, per layer:

* ``"H"``: :math:`H = \frac{2}{m}\sum x x^\top` over the ``m`` input rows: the Hessian of the
  layer objective every weight solver minimises, and (as :math:`A = H/2`) K-FAC's input factor.
  With ``bias_column=True`` the inputs of layers with a bias get a trailing 1 (K-FAC's
  bias-augmented factor);
* ``"G"``: K-FAC's output factor :math:`G = \frac1N \sum_{rows} \sum_c \delta_c \delta_c^\top`
  over the ``N`` likelihood rows, with :math:`\delta_c` the gradients of ``fisher``: ``"mc"``
  (one target sampled from the model per row: a Monte Carlo GGN), ``"exact"`` (every column
  of the output Hessian's square root: the exact GGN; for few outputs) or ``"ef"`` (observed
  targets: the empirical Fisher), so that the GGN block is about :math:`N\,G \otimes A`;
* ``"ef_diag"``, ``"ggn_diag"``: diagonal empirical Fisher (observed targets) and Monte Carlo
  GGN (sampled targets) of the mean loss, :math:`\frac1N \sum \delta^2 (x^2)^\top`, treating
  each position of a sequence (or pixel of an image) as a sample of the gradient;
* ``"ranges"``: the per-input-feature minimum and maximum of the layer's inputs.

The solvers (through :mod:`qbayes.calibrate`), the mixed-precision criteria and the K-FAC
Laplace posterior all call this function. The model is reached only through its adapter
(:mod:`qbayes.models.adapter`): ``adapter.forward(batch)`` runs it and
``adapter.outputs(batch)`` gives the likelihood's outputs and observed targets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, QBayesError
from .ggn import log_likelihood, output_hessian_sqrt, sample_labels
from .input_stats import InputSecondMoment

WANTS = ("H", "G", "ef_diag", "ggn_diag", "ranges")
FISHERS = ("mc", "exact", "ef")


@dataclass
class LayerStatistics:
    """What :func:`collect` gathered for one layer (fields not asked for stay ``None``)."""

    H: torch.Tensor | None = None          # (in, in)   2/m Σ x xᵀ (bias-augmented if asked)
    G: torch.Tensor | None = None          # (out, out) 1/N Σ δ δᵀ
    ef_diag: torch.Tensor | None = None    # (out, in)  1/N Σ δ² (x²)ᵀ, observed targets
    ggn_diag: torch.Tensor | None = None   # (out, in)  the same, sampled targets
    xmin: torch.Tensor | None = None       # (in,)
    xmax: torch.Tensor | None = None       # (in,)
    n_inputs: int = 0                      # rows that entered H

    @property
    def A(self) -> torch.Tensor:
        """K-FAC's input factor ``H / 2``."""
        return self.H / 2


@dataclass
class Collection:
    """Per-layer :class:`LayerStatistics` plus what the pass saw of the model's outputs."""

    layers: dict[str, LayerStatistics] = field(default_factory=dict)
    n_samples: int = 0                     # samples (batch rows) seen
    n_rows: int = 0                        # likelihood rows N (tokens, pixels, samples)
    n_outputs: int | None = None           # C
    nll: float | None = None               # summed negative log-likelihood of the observed targets

    def __getitem__(self, name: str) -> LayerStatistics:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def items(self):
        return self.layers.items()


class _Stop(Exception):
    pass


def _rows_in(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows ``(m, in)`` (im2col patches for a convolution)."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise QBayesError("collect: Conv2d with groups, non-zero padding modes or string padding is not supported; leave such layers out of `layers`")
        cols = nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _rows_out(layer: nn.Module, g: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def _width(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1], layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    raise QBayesError(f"collect supports nn.Linear and nn.Conv2d layers, not {type(layer).__name__}")


def collect(adapter: Any, layers: Mapping[str, nn.Module], batches: Iterable, want: Iterable[str] = ("H",), *,
            fisher: str = "mc", bias_column: bool = False, nll: bool = False, seed: int = 0,
            dtype: torch.dtype = torch.float32, stop_early: bool = False, progress: bool = False,
            desc: str = "curvature statistics") -> Collection:
    """Gather the statistics ``want`` of ``layers`` in one pass of ``adapter``'s model over ``batches``.

    Args:
        adapter: a :class:`qbayes.models.ModelAdapter` (or anything with its ``forward``,
            ``outputs``, ``rows`` and ``likelihood``).
        layers: ``{name: nn.Linear | nn.Conv2d}`` inside the model.
        batches: iterable of the adapter's batches, read once (a one-shot generator is fine).
        want: any of :data:`WANTS`.
        fisher: what ``"G"`` is made of: ``"mc"``, ``"exact"`` or ``"ef"`` (see the module).
        bias_column: augment ``H`` with a constant input for layers with a bias (K-FAC).
        nll: also sum the negative log-likelihood of the observed targets (``Collection.nll``).
        seed: seeds the sampled targets.
        dtype: accumulation dtype (float64 for reference checks and Laplace).
        stop_early: when only input statistics are wanted, stop each forward pass once every
            layer has seen its input (the rest of the model is not run).
        progress: a tqdm bar over batches.
    """
    want = tuple(want)
    bad = set(want) - set(WANTS)
    if bad:
        raise QBayesError(f"collect: unknown statistics {sorted(bad)}: choose from {WANTS}")
    if fisher not in FISHERS:
        raise QBayesError(f"collect: fisher must be one of {FISHERS}, not {fisher!r}")
    names = list(layers)
    if not names:
        raise QBayesError("collect: no layers given")
    widths = {n: _width(m) for n, m in layers.items()}
    grads = {"G", "ef_diag", "ggn_diag"} & set(want)
    need_outputs = bool(grads) or nll
    aug = {n: bias_column and getattr(m, "bias", None) is not None for n, m in layers.items()}
    dev = {n: m.weight.device for n, m in layers.items()}
    accH = {n: InputSecondMoment(widths[n][0] + aug[n], dtype=dtype, device=dev[n]) for n in names} if "H" in want else {}
    accG = {n: InputSecondMoment(widths[n][1], dtype=dtype, device=dev[n]) for n in names} if "G" in want else {}
    diag = {k: {n: torch.zeros(widths[n][1], widths[n][0], dtype=dtype, device=dev[n]) for n in names}
            for k in ("ef_diag", "ggn_diag") if k in want}
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    share: dict[str, str] | None = None  # layers reading one input tensor share one H (q/k/v, gate/up)
    seen_inputs: list[tuple[str, torch.Tensor]] = []
    outs: dict[str, list] = {n: [] for n in names}
    ins: dict[str, list] = {n: [] for n in names}
    gen = None
    res = Collection()
    total_nll = 0.0

    def fwd(name, layer):
        def hook(_mod, args, out):
            x = args[0].detach()
            seen_inputs.append((name, args[0]))  # the tensor object itself: its identity marks shared inputs
            rows = None
            if "H" in want and (share is None or share[name] == name):
                rows = _rows_in(layer, x)
                accH[name].update(_augment(rows, accH[name].dim) if aug[name] else rows)
            if "ranges" in want:
                rows = _rows_in(layer, x) if rows is None else rows
                mn, mx = rows.amin(0).to(dtype), rows.amax(0).to(dtype)
                lo[name] = mn if name not in lo else torch.minimum(lo[name], mn)
                hi[name] = mx if name not in hi else torch.maximum(hi[name], mx)
            if grads:
                if not out.requires_grad:  # parameters frozen: make the graph start here
                    out = out + out.new_zeros((), requires_grad=True)
                outs[name].append(out)
                ins[name].append(x)
                return out
            if stop_early and not need_outputs and len({n for n, _ in seen_inputs}) == len(names):
                raise _Stop
        return hook

    handles = [m.register_forward_hook(fwd(n, m)) for n, m in layers.items()]
    try:
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            seen_inputs.clear()
            if need_outputs:
                with torch.enable_grad() if grads else torch.no_grad():
                    f, y = adapter.outputs(batch)
                    if nll:
                        if y is None:
                            raise QBayesError("collect(nll=True): the batches have no observed targets")
                        total_nll += float(-log_likelihood(adapter.likelihood, f.detach(), y))
                    if grads:
                        if gen is None and ("ggn_diag" in want or ("G" in want and fisher == "mc")):
                            gen = torch.Generator(device=f.device).manual_seed(seed)
                        _backward(adapter.likelihood, f, y, want, fisher, gen, names, layers, outs, ins, accG, diag)
                res.n_rows += f.shape[0]
                res.n_outputs = f.shape[-1]
                del f
            else:
                with torch.no_grad():
                    try:
                        adapter.forward(batch)
                    except _Stop:
                        pass
            if share is None and "H" in want:
                share = _sharing(seen_inputs, names)
            res.n_samples += adapter.rows(batch)
            for n in names:
                outs[n].clear()
                ins[n].clear()
            seen_inputs.clear()
    finally:
        for h in handles:
            h.remove()
    if res.n_samples == 0:
        raise CalibrationError("collect: the batches are empty: pass at least one batch")
    missing = [n for n in names if "H" in want and accH[(share or {}).get(n, n)].n == 0]
    if missing:
        raise CalibrationError(f"collect: layers {missing[:3]} never ran on the batches")
    N = max(res.n_rows, 1)
    for n in names:
        st = LayerStatistics()
        if "H" in want:
            src = accH[share[n] if share else n]
            st.H, st.n_inputs = src.H, src.n
        if "G" in want:
            st.G = accG[n].H / 2 * (accG[n].n / N)  # mean over the rows it saw -> 1/N
        for k in diag:
            setattr(st, k, diag[k][n] / N)
        if "ranges" in want:
            st.xmin, st.xmax = lo.get(n), hi.get(n)
        res.layers[n] = st
    res.nll = total_nll if nll else None
    return res


def _augment(rows: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)


def _sharing(seen: list[tuple[str, torch.Tensor]], names: list[str]) -> dict[str, str]:
    """Map each layer to the first layer that read the very same input tensor in this pass."""
    first: dict[int, str] = {}
    rep = {}
    for n, x in seen:
        if n not in rep:
            rep[n] = first.setdefault(id(x), n)
    return {n: rep.get(n, n) for n in names}


def _backward(likelihood, f, y, want, fisher, gen, names, layers, outs, ins, accG, diag):
    """Output gradients of the wanted losses, turned into G and the diagonal Fishers."""
    order = [(n, k) for n in names for k in range(len(outs[n]))]
    tensors = [outs[n][k] for n, k in order]
    if not tensors:
        return
    passes = []  # (kind, grad_outputs or target)
    if "ef_diag" in want or ("G" in want and fisher == "ef"):
        if y is None:
            raise QBayesError("the empirical Fisher needs observed targets; these batches have none (use fisher='mc')")
        passes.append(("ef", y))
    if "ggn_diag" in want or ("G" in want and fisher == "mc"):
        passes.append(("mc", sample_labels(likelihood, f, gen)))
    if "G" in want and fisher == "exact":
        L = output_hessian_sqrt(likelihood, f.detach())
        passes += [("exact", L[:, :, c]) for c in range(L.shape[2])]
    for i, (kind, arg) in enumerate(passes):
        keep = i < len(passes) - 1
        if kind == "exact":
            gs = torch.autograd.grad(f, tensors, grad_outputs=arg, retain_graph=keep, allow_unused=True)
        else:
            gs = torch.autograd.grad(-log_likelihood(likelihood, f, arg), tensors, retain_graph=keep, allow_unused=True)
        for (n, k), g in zip(order, gs):
            if g is None:
                continue
            d = _rows_out(layers[n], g)
            if "G" in want and kind == ("ef" if fisher == "ef" else fisher):
                accG[n].update(d)
            key = {"ef": "ef_diag", "mc": "ggn_diag"}.get(kind)
            if key in diag:
                x = _rows_in(layers[n], ins[n][k])
                acc = diag[key][n]
                acc.add_((d.to(acc.dtype).square().T @ x.to(acc.dtype).square()))
