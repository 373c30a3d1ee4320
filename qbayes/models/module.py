"""Adapter for plain PyTorch modules (``nn.Sequential`` CNNs, MLPs, any ``nn.Module`` called
as ``model(x)``): the fallback when no family adapter matches.

The whole model is one block (there is no repeated unit to calibrate one after another). A
batch is an input tensor or an ``(x, y)`` pair; the likelihood is given at construction
(``"classification"`` over the model's outputs by default, or ``"regression"``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CalibrationError, QBayesError
from .adapter import LIKELIHOODS, ModelAdapter, register_adapter


@register_adapter
class ModuleAdapter(ModelAdapter):
    family = "module"
    drives = "plain nn.Modules (no transformers config) called as model(x)"

    def __init__(self, model: nn.Module, likelihood: str = "classification"):
        super().__init__(model)
        if likelihood not in LIKELIHOODS:
            raise QBayesError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}")
        self.likelihood = likelihood

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        # a transformers model no family adapter knows must not be driven as a plain module
        # (its forward takes keyword inputs and returns an output object)
        return isinstance(model, nn.Module) and getattr(getattr(model, "config", None), "model_type", None) is None

    def check_batch(self, batch):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(f"a batch for a plain module is a tensor or an (x, y) pair, not {type(batch).__name__}")
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor) \
                and batch[1].shape[0] != x.shape[0]:
            raise CalibrationError(f"inputs ({x.shape[0]}) and targets ({batch[1].shape[0]}) differ in length")
        return batch
