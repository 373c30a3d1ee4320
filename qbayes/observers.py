r"""Observers: streaming estimates of an activation's quantization range from calibration batches.

Each observer sees batches through :meth:`Observer.update` and reports ``(lo, hi)`` through
:meth:`Observer.range`; :func:`act_params` turns a range into the ``(scale, zero)`` of an
:class:`~qbayes.spec.ActSpec` (float32 scales, integer zero-points; for the log formats the
scale is ``hi``).

* ``minmax``: the running min and max (per tensor or per channel).
* ``ema``: an exponential moving average of each batch's min and max (momentum ``c``:
  ``lo ← (1 − c) lo + c · min(batch)``, the first batch taken as is).
* ``percentile``, ``mse``, ``entropy``: read a histogram of every value seen. The histogram is
  exact: bin ``k`` holds the values in ``[k w, (k+1) w)`` with ``w`` a power of two, and when a
  batch falls outside the ``B`` bins the width doubles by merging pairs of bins (or the window
  slides), so no value is ever re-binned approximately.

  - ``percentile``: the ``(100 − p)``-th and ``p``-th percentiles, linear within a bin.
  - ``mse``: the range minimising the expected ``L_p`` error of the actual quantization grid,
    ``Σ_k n_k E|x_k − q(x_k)|^p`` with the in-range error modelled as uniform rounding noise,
    ``(s/2)^p / (p + 1)``, and clipped values' error ``|m_k − clamp(m_k)|^p`` at bin centres ``m_k``
    (Banner et al. 2019's ACIQ analysis, searched on the histogram instead of assuming a density).
  - ``entropy``: the threshold ``t`` on ``|x|`` minimising ``KL(P ‖ Q)`` between the clipped
    histogram ``P`` and its ``2^(b−1)``-level (``2^b`` for non-negative data) quantized version ``Q``
    (Migacz 2017, the TensorRT calibrator).
"""
from __future__ import annotations

import math

import torch

from .errors import CalibrationError, QBayesError
from .formats import params_from_range
from .spec import ActSpec

BINS = 4096


class Observer:
    """Base: ``update`` with batches, then ``range() -> (lo, hi)``."""

    def __init__(self, spec: ActSpec, channel_axis: int | None = None):
        self.spec, self.channel_axis, self.batches = spec, channel_axis, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError("an observed activation holds NaN or Inf: check the model and the "
                                   "calibration inputs before quantizing its activations")
        if self.spec.format != "int" and bool((x < 0).any()):
            raise QBayesError(f"{self.spec.format} activations must be non-negative (post-softmax); "
                              f"this input reaches {float(x.min()):.3g}: use format='int' here")
        self._update(x)
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.batches:
            raise CalibrationError("the activation observer saw no data: run calibration batches through "
                                   "the model before freezing its activation ranges")
        return self._range()

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor or per-channel min and max of one batch (float64)."""
        x = x.double()
        if self.channel_axis is None:
            return x.min(), x.max()
        flat = x.movedim(self.channel_axis, 0).reshape(x.shape[self.channel_axis], -1)
        return flat.min(1).values, flat.max(1).values

    def _update(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _range(self):  # pragma: no cover - abstract
        raise NotImplementedError


class MinMax(Observer):
    def _update(self, x):
        lo, hi = self._reduce(x)
        if self.batches:
            lo, hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
        self.lo, self.hi = lo, hi

    def _range(self):
        return self.lo, self.hi


class MovingAverage(Observer):
    def __init__(self, spec, channel_axis=None, momentum: float = 0.01):
        super().__init__(spec, channel_axis)
        self.momentum = momentum

    def _update(self, x):
        lo, hi = self._reduce(x)
        if self.batches:
            c = self.momentum
            lo, hi = (1 - c) * self.lo + c * lo, (1 - c) * self.hi + c * hi
        self.lo, self.hi = lo, hi

    def _range(self):
        return self.lo, self.hi


class Histogram(Observer):
    """The exact power-of-two-width histogram every histogram observer reads."""

    def __init__(self, spec, channel_axis=None, bins: int = BINS):
        if channel_axis is not None:
            raise QBayesError(f"the {spec.observer!r} observer is per-tensor only")
        super().__init__(spec, channel_axis)
        self.bins, self.counts, self.w, self.k0 = bins, None, 0.0, 0
        self.xmin, self.xmax = math.inf, -math.inf

    def _update(self, x):
        x = x.double().flatten()
        lo, hi = float(x.min()), float(x.max())
        self.xmin, self.xmax = min(self.xmin, lo), max(self.xmax, hi)
        if self.counts is None:
            span = hi - lo if hi > lo else max(abs(hi), 1.0) * 2.0 ** -20
            self.w = 2.0 ** math.ceil(math.log2(span / (self.bins - 1)))
            self.k0 = math.floor(lo / self.w)
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
        while True:  # the occupied bins and the new values must fit in one window
            nz = torch.nonzero(self.counts).flatten()
            klo, khi = math.floor(lo / self.w), math.floor(hi / self.w)
            if len(nz):
                klo, khi = min(klo, self.k0 + int(nz[0])), max(khi, self.k0 + int(nz[-1]))
            if khi - klo + 1 <= self.bins:
                break
            self._merge()
        if klo < self.k0 or khi > self.k0 + self.bins - 1:  # slide the window to start at klo
            moved = torch.zeros(self.bins, dtype=torch.float64)
            moved.index_add_(0, nz + (self.k0 - klo), self.counts[nz])
            self.counts, self.k0 = moved, klo
        idx = torch.floor(x / self.w).long() - self.k0
        self.counts += torch.bincount(idx, minlength=self.bins).double()

    def _merge(self) -> None:
        """Double the bin width: bin ``k`` of the old grid goes to bin ``floor(k / 2)``."""
        new_k0 = self.k0 // 2
        target = (torch.arange(self.bins) + self.k0) // 2 - new_k0
        merged = torch.zeros(self.bins, dtype=torch.float64)
        merged.index_add_(0, target, self.counts)
        self.counts, self.k0, self.w = merged, new_k0, self.w * 2

    def edges(self) -> torch.Tensor:
        """The ``bins + 1`` bin edges."""
        return (torch.arange(self.bins + 1, dtype=torch.float64) + self.k0) * self.w

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0..1) of the values seen, linear within its bin, inside [min, max]."""
        cum = torch.cumsum(self.counts, 0)
        target = q * float(cum[-1])
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).clamp(max=self.bins - 1))
        before = float(cum[i - 1]) if i else 0.0
        inside = float(self.counts[i])
        frac = (target - before) / inside if inside > 0 else 0.0
        v = (self.k0 + i + frac) * self.w
        return min(max(v, self.xmin), self.xmax)


class Percentile(Histogram):
    def _range(self):
        p = self.spec.percentile / 100.0
        lo = self.quantile(1.0 - p) if self.xmin < 0 else self.xmin
        return torch.tensor(lo, dtype=torch.float64), torch.tensor(self.quantile(p), dtype=torch.float64)


class MSE(Histogram):
    """Expected ``L_p`` error search over shrunk ranges (``grid`` steps each side)."""

    grid = 100
    maxshrink = 0.95

    def _range(self):
        spec, p = self.spec, self.spec.norm
        e = self.edges()
        m, n = (e[:-1] + e[1:]) / 2, self.counts
        keep = n > 0
        m, n = m[keep], n[keep]
        lo0, hi0 = min(self.xmin, 0.0), max(self.xmax, 0.0)
        shrink = 1.0 - torch.arange(0, int(self.maxshrink * self.grid) + 1, dtype=torch.float64) / self.grid
        if spec.format != "int":
            los, his = torch.zeros_like(shrink), hi0 * shrink
        elif spec.symmetric:
            amax = max(-lo0, hi0)
            los, his = -amax * shrink, amax * shrink
        elif lo0 == 0.0 or hi0 == 0.0:  # one-signed data: only the far end moves
            los, his = lo0 * shrink, hi0 * shrink
        else:  # asymmetric: every pair of shrunk ends
            los, his = (lo0 * shrink).repeat_interleave(len(shrink)), (hi0 * shrink).repeat(len(shrink))
        err = torch.cat([self._expected_error(m, n, lo, hi, p) for lo, hi in zip(los.split(256), his.split(256))])
        # ties keep the widest range (the first candidate), so the result is never worse than min-max
        best = int(torch.nonzero(err <= err.min()).flatten()[0])
        return los[best], his[best]

    def _expected_error(self, m, n, los, his, p):
        spec = self.spec
        mm = m.unsqueeze(0)
        if spec.format != "int":  # log codes: relative rounding error in range, flushed to 0 below it
            k = 1 if spec.format == "log2" else 2
            u = torch.linspace(-0.5, 0.5, 1001, dtype=torch.float64)
            rel = (1 - torch.exp2(u / k)).abs().pow(p).mean()
            top = his.clamp(min=1e-300).unsqueeze(1)
            floor = top * 2.0 ** (-((1 << spec.bits) - 2 + 0.5) / k)
            err = torch.where(mm > top, (mm - top).abs().pow(p), torch.where(mm < floor, mm.pow(p), mm.pow(p) * rel))
            return (n * err).sum(1)
        s, z = params_from_range(los, his, spec.bits, spec.symmetric, None)
        qlo, qhi = (s * (0 - z)).unsqueeze(1), (s * ((1 << spec.bits) - 1 - z)).unsqueeze(1)
        clipped = (mm - mm.clamp(qlo, qhi)).abs().pow(p)
        inside = ((mm >= qlo) & (mm <= qhi)).double() * ((s / 2).pow(p) / (p + 1)).unsqueeze(1)
        return (n * (clipped + inside)).sum(1)


class Entropy(Histogram):
    """KL-divergence threshold on ``|x|`` (at most ``candidates`` thresholds are tried)."""

    candidates = 256

    def _range(self):
        signed = self.xmin < 0
        levels = 1 << (self.spec.bits - (1 if signed else 0))
        hist = self._abs_histogram()
        nb = len(hist)
        if nb <= levels:  # fewer occupied bins than levels: nothing is gained by clipping
            t = max(-self.xmin, self.xmax)
        else:
            step = max(1, (nb - levels) // self.candidates)
            best, t = math.inf, max(-self.xmin, self.xmax)
            for i in range(levels, nb + 1, step):
                kl = _kl_clipped(hist, i, levels)
                if kl < best:
                    best, t = kl, i * self.w
            t = min(t, max(-self.xmin, self.xmax))
        lo = torch.tensor(max(self.xmin, -t) if signed else self.xmin, dtype=torch.float64)
        return lo, torch.tensor(min(self.xmax, t), dtype=torch.float64)

    def _abs_histogram(self) -> torch.Tensor:
        """Counts of ``|x|`` in bins ``[j w, (j+1) w)``, ``j = 0..`` (folding is exact on this grid)."""
        k = torch.arange(self.bins) + self.k0
        j = torch.where(k >= 0, k, -k - 1)
        out = torch.zeros(int(j.max()) + 1, dtype=torch.float64)
        out.index_add_(0, j, self.counts)
        last = int(torch.nonzero(out).flatten()[-1]) + 1
        return out[:last]


def _kl_clipped(hist: torch.Tensor, i: int, levels: int) -> float:
    """KL(P‖Q) of the first ``i`` bins (outliers added to the last) against ``levels`` merged bins."""
    p = hist[:i].clone()
    p[-1] += hist[i:].sum()
    src = hist[:i]
    chunk = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
    nz = (src > 0).double()
    total = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, src)
    count = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, nz)
    q = torch.where(nz > 0, (total / count.clamp(min=1))[chunk], torch.zeros_like(src))
    keep = p > 0
    p, q = p[keep] / p.sum(), q[keep]
    q = q.clamp(min=1e-12 * float(q.sum())) / q.sum()  # a value P has and Q lost costs a large finite KL
    return float((p * torch.log(p / q)).sum())


OBSERVER_CLASSES = {"minmax": MinMax, "ema": MovingAverage, "percentile": Percentile, "mse": MSE, "entropy": Entropy}


def make_observer(spec: ActSpec, channel_axis: int | None = None) -> Observer:
    """The observer ``spec.observer`` names (``channel_axis`` for per-channel ranges)."""
    if spec.granularity == "per-channel" and channel_axis is None:
        raise QBayesError("per-channel activation ranges need the channel axis of the observed tensor")
    return OBSERVER_CLASSES[spec.observer](spec, channel_axis if spec.granularity == "per-channel" else None)


def act_params(lo: torch.Tensor, hi: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` in float32 for the range ``[lo, hi]`` (log formats: ``scale = hi``, zero 0)."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
    if spec.format != "int":
        s = torch.where(hi > 0, hi, torch.ones_like(hi)).float()
        return s, torch.zeros_like(s)
    s, z = params_from_range(lo, hi, spec.bits, spec.symmetric, None)
    return s.float(), z.float()
