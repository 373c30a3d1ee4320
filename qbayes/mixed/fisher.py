r"""Diagonal empirical-Fisher weighted perturbation (as in FIMA-Q):
:math:`\Delta L \approx \tfrac12 \sum_{ij} F_{ij}\,\Delta W_{ij}^2`, with ``F`` the diagonal
empirical Fisher of the mean loss from :func:`qbayes.curvature.collect`.
"""
from __future__ import annotations

import torch

from ..curvature import LayerStatistics


def fisher(dW: torch.Tensor, st: LayerStatistics) -> float:
    return 0.5 * float((st.ef_diag.double() * dW.double().square()).sum())
