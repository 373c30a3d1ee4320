r"""Float targets (GPTAQ-style asymmetric calibration): fit the quantized layer to the *float*
model's output while it reads the *quantized* model's input.

Plain sequential GPTQ minimises :math:`\|(W - Q)\,X_q\|^2`: each layer reproduces what the float
weights would compute on the already-quantized inputs :math:`X_q`, so the error made upstream is
carried on. With float targets the objective is :math:`\|W X_f - Q X_q\|^2` (:math:`X_f`: the
float model's inputs of the same layer on the same tokens). With a ridge term that keeps the
target near :math:`W` where the calibration data says nothing,

.. math::  \|W X_f - \tilde W X_q\|^2 + \lambda' \|\tilde W - W\|^2
           \;\Rightarrow\; \tilde W = W + W\,(C - H)\,(H + \lambda I)^{-1},

with :math:`H = \tfrac2n X_q^\top X_q`, :math:`C = \tfrac2n X_f^\top X_q` and
:math:`\lambda` = ``damp`` · mean(diag H). Because the residual :math:`W X_f - \tilde W X_q` is
orthogonal to the span of :math:`X_q`, the objective is :math:`\|(\tilde W - Q) X_q\|^2` plus a
constant: the unchanged GPTQ solver run on :math:`\tilde W` minimises it. When nothing upstream
is quantized (:math:`X_f = X_q`) the target is exactly :math:`W`.
"""
from __future__ import annotations

import torch

from ..errors import QBayesError


def float_target_weight(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight :math:`\\tilde W` (out, in) whose output on the quantized inputs best matches
    ``W``'s on the float inputs; ``H``, ``C`` (in, in) as in the module docstring."""
    cols = W.shape[1]
    if H.shape != (cols, cols) or C.shape != (cols, cols):
        raise QBayesError(f"float targets: H {tuple(H.shape)} and C {tuple(C.shape)} must both be ({cols}, {cols})")
    if not damp > 0:
        raise QBayesError(f"float targets need a positive damp (the ridge term), got {damp}")
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    Hd, Cd, Wd = H.to(dtype), C.to(dtype), W.to(dtype)
    lam = damp * float(torch.diag(Hd).mean())
    if not lam > 0:  # no input ever reached the layer: nothing to correct
        return W.clone()
    A = Hd + lam * torch.eye(cols, dtype=dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise QBayesError("float targets: H + damp·I is not positive definite; raise damp")
    correction = torch.cholesky_solve((Wd @ (Cd - Hd)).T, L).T  # W (C - H) A⁻¹, A symmetric
    return (Wd + correction).to(W.dtype)
