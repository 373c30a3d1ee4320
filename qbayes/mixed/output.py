r"""Output proxy: :math:`\operatorname{tr}(\Delta W\, H\, \Delta W^\top)` with the calibration
statistic ``H = (2/n) Σ x xᵀ`` the solvers already use: twice the expected squared output error
of the layer (not in loss units; only the ranking and the relative sizes across layers matter to
the allocator).
"""
from __future__ import annotations

import torch

from ..curvature import LayerStatistics


def output(dW: torch.Tensor, st: LayerStatistics) -> float:
    d = dW.double()
    return float(((d @ st.H.double()) * d).sum())
