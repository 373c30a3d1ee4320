r"""HAWQ (Dong et al. 2019/2020): the layer's average Hessian eigenvalue times the perturbation,

.. math:: \Delta L_\ell \approx \tfrac12\,\frac{\operatorname{tr}(\nabla^2_{W_\ell} L)}{n_\ell}\,\|\Delta W_\ell\|^2,

with the trace from Hutchinson's estimator (:func:`qbayes.curvature.hutchinson_trace`).
"""
from __future__ import annotations

import torch


def hawq(dW: torch.Tensor, trace_per_param: float) -> float:
    return 0.5 * trace_per_param * float(dW.double().square().sum())
