r"""The four 2-D test energies of Rezende & Mohamed (2015), Table 1, and their normalisers on a box.

Each ``U(z)`` maps ``z`` of shape ``(n, 2)`` (or ``(..., 2)``) to ``(n,)``; the unnormalised
density is :math:`e^{-U(z)}`. With :math:`w_1 = \sin(2\pi z_1/4)`,
:math:`w_2 = 3\exp(-\tfrac12((z_1-1)/0.6)^2)`, :math:`w_3 = 3\sigma((z_1-1)/0.3)`:

.. math::
    U_1 &= \tfrac12\big((\|z\| - 2)/0.4\big)^2
           - \log\big(e^{-\frac12((z_1-2)/0.6)^2} + e^{-\frac12((z_1+2)/0.6)^2}\big) \\
    U_2 &= \tfrac12\big((z_2 - w_1)/0.4\big)^2 \\
    U_3 &= -\log\big(e^{-\frac12((z_2-w_1)/0.35)^2} + e^{-\frac12((z_2-w_1+w_2)/0.35)^2}\big) \\
    U_4 &= -\log\big(e^{-\frac12((z_2-w_1)/0.4)^2} + e^{-\frac12((z_2-w_1+w_3)/0.35)^2}\big)

Only :math:`U_1` is normalisable on :math:`\mathbb{R}^2`: :math:`U_2`-:math:`U_4` do not grow
with :math:`|z_1|`, so :math:`\int e^{-U} = \infty` and they are meaningful as densities only on a
bounded region; the paper plots them on :math:`[-4, 4]^2`. :func:`log_partition` integrates on
such a box, and :func:`boxed` turns an energy into a normalisable one confined to it.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable

import torch

from ..errors import QBayesError

Energy = Callable[[torch.Tensor], torch.Tensor]


def _check(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if z.shape[-1] != 2:
        raise QBayesError(f"the test energies are 2-D: z must have shape (n, 2), not {tuple(z.shape)}")
    return z[..., 0], z[..., 1]


def _w1(z1: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * z1 / 4)


def u1(z: torch.Tensor) -> torch.Tensor:
    """Ring with two lobes."""
    z1, _ = _check(z)
    ring = 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - 2) / 0.4) ** 2
    return ring - torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)


def u2(z: torch.Tensor) -> torch.Tensor:
    """A sine wave."""
    z1, z2 = _check(z)
    return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2


def u3(z: torch.Tensor) -> torch.Tensor:
    """Two sine waves joined by a bump."""
    z1, z2 = _check(z)
    w1, w2 = _w1(z1), 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    return -torch.logaddexp(-0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2)


def u4(z: torch.Tensor) -> torch.Tensor:
    """Two sine waves joined by a step."""
    z1, z2 = _check(z)
    w1, w3 = _w1(z1), 3 * torch.sigmoid((z1 - 1) / 0.3)
    return -torch.logaddexp(-0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2)


ENERGIES: MappingProxyType[str, Energy] = MappingProxyType({"U1": u1, "U2": u2, "U3": u3, "U4": u4})


def boxed(U: Energy, lim: float = 4.0, width: float = 0.05) -> Energy:
    r"""``U`` plus a quadratic wall outside :math:`[-\mathrm{lim}, \mathrm{lim}]^2`:

    .. math:: U_\square(z) = U(z) + \tfrac12 \sum_i \big(\max(|z_i| - \mathrm{lim}, 0)/\mathrm{width}\big)^2.

    Equal to ``U`` inside the box and normalisable (for the energies here), so a KL to it is
    finite; the mass outside the box is of order ``width``, so integrate it (with
    :func:`log_partition`) on a box a few widths larger than ``lim``.
    """
    if lim <= 0 or width <= 0:
        raise QBayesError(f"boxed needs lim > 0 and width > 0; got lim={lim}, width={width}")

    def energy(z: torch.Tensor) -> torch.Tensor:
        over = torch.clamp(z.abs() - lim, min=0.0) / width
        return U(z) + 0.5 * (over * over).sum(-1)

    return energy


def _weights(n: int, h: float, rule: str) -> torch.Tensor:
    w = torch.full((n,), h, dtype=torch.float64)
    if rule == "trapezoid":
        w[0] = w[-1] = h / 2
    elif rule == "simpson":
        if n % 2 == 0:
            raise QBayesError(f"Simpson's rule needs an odd number of points, not n={n}")
        w[1:-1:2], w[2:-1:2] = 4 * h / 3, 2 * h / 3
        w[0] = w[-1] = h / 3
    else:
        raise QBayesError(f"rule must be 'trapezoid' or 'simpson', not {rule!r}")
    return w


@torch.no_grad()
def log_partition(U: Energy, lim: float = 4.0, n: int = 1000, rule: str = "trapezoid",
                  rows_per_chunk: int = 250) -> float:
    r""":math:`\log Z = \log \int_{[-\mathrm{lim}, \mathrm{lim}]^2} e^{-U(z)}\,dz` by a tensor-product rule.

    ``n`` points per axis (``rule`` ``"trapezoid"`` or ``"simpson"``, the latter for odd ``n``), in
    float64, summed stably: :math:`\log Z = \mathrm{logsumexp}_{ij}(-U(z_{ij}) + \log w_i + \log w_j)`.
    ``U`` must accept a float64 ``(m, 2)`` tensor.
    """
    if n < 2 or lim <= 0:
        raise QBayesError(f"log_partition needs n >= 2 points per axis and lim > 0; got n={n}, lim={lim}")
    x = torch.linspace(-lim, lim, n, dtype=torch.float64)
    log_w = _weights(n, 2 * lim / (n - 1), rule).log()
    parts = []
    for start in range(0, n, rows_per_chunk):
        xs = x[start:start + rows_per_chunk]
        z = torch.stack(torch.meshgrid(xs, x, indexing="ij"), -1).reshape(-1, 2)
        terms = -U(z).reshape(len(xs), n) + log_w[start:start + rows_per_chunk, None] + log_w[None, :]
        parts.append(torch.logsumexp(terms.reshape(-1), 0))
    value = float(torch.logsumexp(torch.stack(parts), 0))
    if not math.isfinite(value):
        raise QBayesError(f"log Z is not finite ({value}); check that U is finite somewhere on the box")
    return value
