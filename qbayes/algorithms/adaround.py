r"""AdaRound (Nagel, Amjad, van Baalen, Louizos & Blankevoort, 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization").

The scales and zero-points are RTN's (:func:`qbayes.ranges.choose_params`, so the spec's
``clip`` is honoured); only the rounding direction of each weight is learned. With
:math:`t = w/s + z`, the code is :math:`\lfloor t \rfloor + h(V)`, where the rectified sigmoid
:math:`h(V) = \mathrm{clip}(\sigma(V)(\zeta - \gamma) + \gamma, 0, 1)` (ζ = 1.1, γ = −0.1) starts
at the fractional part :math:`t - \lfloor t \rfloor`. Adam minimises

.. math::  \frac{\operatorname{tr}((W - \tilde W) H (W - \tilde W)^\top)}{f_\mathrm{RTN} / n}
           + \lambda \sum_{ij} \big(1 - |2 h_{ij} - 1|^{\beta}\big),
           \qquad \tilde W = s\,(\lfloor t \rfloor + h(V) - z),

the layer objective normalised per output row by that row's round-to-nearest objective per
weight (rows are independent, so each row's trade-off between the objective and the
regulariser is the same whatever its scale), λ = ``reg``. The regulariser is off for the first
``warmup`` fraction of the iterations, then β decays linearly from ``beta[0]`` to ``beta[1]``,
pushing every ``h`` to 0 or 1. At the end ``h`` is rounded and the codes clamped to the format's
range.

Implementation choices:

* The objective is a quadratic form, so its gradient :math:`-2 s \odot ((W - \tilde W) H)` is
  computed directly: one ``(rows, cols) × (cols, cols)`` product per iteration, the value
  coming for free. A Cholesky factor ``L`` (:math:`\|(W - \tilde W) L\|^2`) would need two
  products per step, a truncated eigenbasis would change the objective.
* The whole layer is optimised at once (full batch, exact gradient, no sampling of inputs), so
  far fewer steps than the paper's 10k-20k stochastic ones suffice. Defaults ``iters=1000``,
  ``lr=0.1``, ``reg=30``: on the CIFAR-10 CNN's layers (W4 per channel) 500 steps left the
  objective 10-40% above that of 2000-3000 steps, 1000 came within a few percent on all but
  the most ill-conditioned layer (a 512×1024 linear); ``lr`` 0.05-0.3 and ``reg`` 10-300 gave
  about the same, ``reg`` ≤ 3 clearly worse. The step costs about 1000 products with ``H``,
  ~30 CPU-seconds for that whole CNN on one core.
* Layers with at most ``exact_cols`` inputs (a 3×3 depthwise convolution has 9) are solved
  exactly: each row's ``2^cols`` up/down choices are all evaluated. That is the optimum the
  relaxation approximates, and far cheaper than 1000 steps on a 1×9 problem.
* Rows are independent: a row whose learned rounding ends worse than round-to-nearest keeps
  RTN's codes (logged at DEBUG), so the result is never worse than RTN on any row.
* Weights whose two candidate codes clamp to the same one, and dead inputs (``H_jj = 0``,
  zeroed before the ranges are chosen, as in GPTQ), are not optimised; without dead inputs the
  scales and zero-points are exactly RTN's.
* Only formats with a uniform integer grid (``ŵ = s (c − z)``, :attr:`Format.affine`, checked
  through the format's ``decode``) can be rounded up or down; others (``nf4``) are refused.
"""
from __future__ import annotations

import logging
import math

import torch

from ..errors import QBayesError
from ..formats import PER_TENSOR, QuantizedWeight, group_view
from ..formats.int_affine import max_code
from ..ranges import choose_params
from ..spec import QuantSpec
from .base import check_weight

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


def adaround(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    iters: int = 1000,
    lr: float = 0.1,
    reg: float = 30.0,
    beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    exact_cols: int = 10,
) -> QuantizedWeight:
    """Quantize ``W`` (out, in) against the input statistic ``H`` (in, in) by adaptive rounding.

    Options: ``iters`` Adam steps with step size ``lr`` on ``V``; ``reg`` the regulariser's
    weight λ; ``beta`` its exponent's (start, end); ``warmup`` the fraction of steps without it;
    ``exact_cols``: layers with at most this many inputs are solved exactly instead (0: never).
    Deterministic (full batch, ``V`` starts from the fractional parts). Computation runs in
    float64 if ``H`` is float64, else float32.
    """
    check_weight(W, spec)
    _check_options(iters, lr, reg, beta, warmup, exact_cols)
    fmt = spec.fmt
    if not _uniform_grid(fmt, spec.bits):
        raise QBayesError(f"AdaRound learns whether each weight rounds down or up on a uniform integer grid; "
                          f"the {spec.format!r} format's codes are not one: use format='int', or method='gptq'")
    rows, cols = W.shape
    if H is None or H.shape != (cols, cols):
        raise QBayesError(f"AdaRound needs H of shape ({cols}, {cols}), got {None if H is None else tuple(H.shape)}")
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    W = W.to(dtype).clone()
    H = H.to(dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    wg = group_view(W, spec.group_size)
    scale, zero = choose_params(wg, spec)
    S = scale.unsqueeze(-1).expand(wg.shape).reshape(rows, cols)
    Z = zero.unsqueeze(-1).expand(wg.shape).reshape(rows, cols)
    t = W / S + Z
    fl = torch.floor(t)
    top = max_code(spec.bits)
    lo, hi = fl.clamp(0, top), (fl + 1).clamp(0, top)
    free = (hi > lo) & ~dead  # the weights whose rounding direction matters
    R = W - fmt.decode(lo, S, Z)  # W − W̃ = R − A·h
    A = fmt.decode(hi, S, Z) - fmt.decode(lo, S, Z)
    A = torch.where(free, A, torch.zeros_like(A))

    rtn_codes = fmt.encode(W, S, Z, spec.bits)
    f_rtn = _row_objective(W - fmt.decode(rtn_codes, S, Z), H)
    if cols <= exact_cols:
        up = _enumerate(R, A, H)
    else:
        # per row: RTN's objective per weight is 1 (a row RTN solves exactly is left to the regulariser)
        c = torch.where(f_rtn > 0, free.sum(1) / f_rtn, torch.zeros_like(f_rtn))
        p = ((t - fl - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)  # h(V) = fractional part
        up = _anneal(torch.log(p / (1 - p)), R, A, H, c, free, iters, lr, reg, beta, warmup)
    codes = torch.where(up & free, hi, lo)
    # rows are independent: one whose learned rounding does worse than RTN's keeps RTN's
    worse = _row_objective(W - fmt.decode(codes, S, Z), H) > f_rtn
    codes = torch.where(worse.unsqueeze(1), rtn_codes, codes)
    log.debug("AdaRound: %d of %d rows kept round-to-nearest", int(worse.sum()), rows)
    codes = codes.clamp(0, top).to(torch.uint8).contiguous()
    if spec.group_size == PER_TENSOR:
        scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
    return QuantizedWeight(codes, scale, zero, spec.bits, spec.group_size, spec.symmetric, spec.format)


def _row_objective(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    return (D * (D @ H)).sum(1)


def _anneal(V, R, A, H, c, free, iters, lr, reg, beta, warmup) -> torch.Tensor:
    """Adam on ``V`` (β1 = 0.9, β2 = 0.999) with the analytic gradient; returns ``h(V) >= 1/2``."""
    m, v = torch.zeros_like(V), torch.zeros_like(V)
    start = int(warmup * iters)
    gscale = -2 * (ZETA - GAMMA) * c.unsqueeze(1) * A  # d objective / dh = -2 c A ⊙ ((R − A h) H)
    free = free.to(V.dtype)
    for it in range(1, iters + 1):
        sig = torch.sigmoid(V)
        h_raw = sig * (ZETA - GAMMA) + GAMMA
        h = h_raw.clamp(0, 1)
        g = gscale * (torch.addcmul(R, A, h, value=-1) @ H)  # d loss / dh · (ζ − γ)
        if it > start:
            b = beta[1] + (beta[0] - beta[1]) * (1 - (it - start - 1) / max(1, iters - start - 1))
            u = 2 * h - 1  # d/dh (1 − |u|^b) = −2 b |u|^(b−1) sign(u)
            g.addcmul_(u.abs().clamp_min_(1e-6).pow_(b - 2).mul_(u), free, value=-2 * b * reg * (ZETA - GAMMA))
        g.mul_(sig * (1 - sig)).mul_((h_raw > 0) & (h_raw < 1))
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        bc1, bc2 = 1 - 0.9 ** it, 1 - 0.999 ** it
        V.addcdiv_(m, v.sqrt().add_(1e-8 * math.sqrt(bc2)), value=-lr * math.sqrt(bc2) / bc1)
    return torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA >= 0.5


def _enumerate(R, A, H, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """The exact optimum of every row over all ``2^cols`` up/down choices (small ``cols`` only)."""
    rows, cols = R.shape
    k = torch.arange(cols, device=R.device)
    B = ((torch.arange(1 << cols, device=R.device).unsqueeze(1) >> k) & 1).to(R.dtype)  # (2^cols, cols)
    best = []
    step = max(1, chunk_elems // B.numel())
    for r0 in range(0, rows, step):
        D = R[r0:r0 + step].unsqueeze(1) - A[r0:r0 + step].unsqueeze(1) * B  # (rows, 2^cols, cols)
        best.append(B[(D * (D @ H)).sum(-1).argmin(1)])
    return torch.cat(best).bool() if best else torch.zeros_like(R, dtype=torch.bool)


def _uniform_grid(fmt, bits: int) -> bool:
    """Whether ``fmt`` decodes codes ``c`` to ``s (c − z)``: then ⌊t⌋ and ⌊t⌋ + 1 are neighbours."""
    if not getattr(fmt, "affine", False):
        return False
    c = torch.arange(max_code(bits) + 1, dtype=torch.float64)
    z = torch.tensor(float(bits))
    return bool(torch.allclose(fmt.decode(c, torch.tensor(0.5, dtype=torch.float64), z), 0.5 * (c - z)))


def _check_options(iters, lr, reg, beta, warmup, exact_cols) -> None:
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1):
        raise QBayesError(f"AdaRound iters must be an integer >= 1, not {iters!r}")
    if not (number(lr) and lr > 0):
        raise QBayesError(f"AdaRound lr must be a finite number > 0 (Adam's step size, e.g. 0.1), not {lr!r}")
    if not (number(reg) and reg >= 0):
        raise QBayesError(f"AdaRound reg must be a finite number >= 0 (the rounding regulariser's weight), not {reg!r}")
    if not (isinstance(beta, (tuple, list)) and len(beta) == 2 and all(number(b) for b in beta)
            and beta[0] >= beta[1] > 0):
        raise QBayesError(f"AdaRound beta must be a pair (start, end) with start >= end > 0, e.g. (20, 2), not {beta!r}")
    if not (number(warmup) and 0 <= warmup < 1):
        raise QBayesError(f"AdaRound warmup must be a fraction of the iterations in [0, 1), not {warmup!r}")
    if not (isinstance(exact_cols, int) and not isinstance(exact_cols, bool) and 0 <= exact_cols <= 16):
        raise QBayesError(f"AdaRound exact_cols must be an integer from 0 to 16 (2^cols choices are tried), "
                          f"not {exact_cols!r}")
