"""What every weight solver shares: input checks and the layer objective."""
from __future__ import annotations

import torch

from ..errors import QBayesError
from ..spec import QuantSpec


def check_weight(W: torch.Tensor, spec: QuantSpec, name: str = "weight") -> None:
    """Refuse weights a solver cannot quantize faithfully."""
    if W.dim() != 2:
        raise QBayesError(f"{name}: expected a 2-D (out, in) weight, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise QBayesError(f"{name} holds {bad} NaN/Inf values: quantizing it would give a wrong model; "
                          "fix or retrain the weights first")
    spec.check_layer(W.shape[1], name)


def layer_objective(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr((W - Q) H (W - Q)^T)``: the output error a solver minimises (up to a factor 1/2)."""
    D = (W - Q).to(H.dtype)
    return torch.einsum("ij,jk,ik->", D, H, D)
