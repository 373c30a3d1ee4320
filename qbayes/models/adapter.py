r"""Model adapters: the one protocol through which the calibration driver, the curvature
collector, the sensitivity criteria and the Laplace posterior talk to a model.

An adapter knows, for one family of models,

* its **blocks** (the repeated units calibrated one after another; a model without repeated
  blocks is one block, named ``""``) and the **quantizable layers** inside them
  (``nn.Linear`` and ``nn.Conv2d``), and the **attention matmul points** (:meth:`~ModelAdapter.attention_points`);
* what a **batch** is (token ids, a dict of tensors, pixels, ``(x, y)`` pairs): how to check
  calibration data and split it into batches, and how to run the model on one;
* how to run to the **first block** (capturing its call arguments) and how one block's output
  becomes the **next block's inputs**;
* the model's **likelihood**: per-row outputs ``f`` ``(N, C)`` with the observed targets
  ``y`` (or none), and the loss with observed labels or with labels sampled from the model.

Nothing above this module names ``input_ids`` or a model family. A new family is one
adapter class (a subclass of :class:`ModelAdapter` with :meth:`~ModelAdapter.matches`) plus
its :func:`register_adapter` line and its entry in the contract test.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..curvature.ggn import log_likelihood, sample_labels
from ..errors import CalibrationError, QBayesError
from ..nn.surgery import DEFAULT_EXCLUDE, check_selection, name_filter

Batch = Any
LIKELIHOODS = ("classification", "regression")
QUANTIZABLE = (nn.Linear, nn.Conv2d)


class _Stop(Exception):
    """Raised inside a forward pass once everything needed from it has been seen."""


class ModelAdapter(ABC):
    """Base class of every adapter; subclasses override what differs for their family.

    ``likelihood`` is ``"classification"`` (softmax over the last dimension of ``f``) or
    ``"regression"`` (unit-variance Gaussian on ``f``).
    """

    family: str = "module"
    likelihood: str = "classification"
    #: what the adapter drives, for error messages
    drives: str = ""

    def __init__(self, model: nn.Module):
        self.model = model

    # ------------------------------------------------------------------ structure
    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter drives ``model``."""

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """``(qualified name, module)`` of each block in forward order (default: the whole model)."""
        return [("", self.model)]

    def layers(self, include: Iterable[str] | None = None, exclude: Iterable[str] | None = DEFAULT_EXCLUDE,
               kinds: tuple[type, ...] = QUANTIZABLE) -> dict[str, nn.Module]:
        """``{qualified name: layer}`` of the quantizable layers inside the blocks that the glob
        filters keep (``*`` matches dots too), in module order."""
        keep = name_filter(include, exclude)
        out = {}
        for prefix, block in self.blocks():
            for name, mod in block.named_modules():
                full = f"{prefix}.{name}" if prefix and name else (prefix or name)
                if name and isinstance(mod, kinds) and keep(full):
                    out[full] = mod
        return out

    def select(self, spec_for: Callable[[str], Any], include: Iterable[str] | None = None,
               exclude: Iterable[str] | None = DEFAULT_EXCLUDE, kinds: tuple[type, ...] = (nn.Linear,)) -> dict[str, nn.Module]:
        """The layers to quantize, after checking each one can be: a clear error for a named
        module that is missing or not a supported layer, a group size that does not divide,
        or non-finite weights, before anything is changed. ``spec_for(name)`` gives the spec."""
        if include:
            check_selection(self.model, include, kinds)
        selected = self.layers(include, exclude, kinds)
        if not selected:
            where = "inside the blocks " if self.blocks()[0][1] is not self.model else ""
            raise QBayesError(f"no {'/'.join(k.__name__ for k in kinds)} layers {where}match the include/exclude filters")
        for name, layer in selected.items():
            spec_for(name).check_layer(layer.weight[0].numel(), name)
            if not torch.isfinite(layer.weight).all():
                raise QBayesError(f"{name}.weight holds NaN/Inf values: refusing to quantize a broken model")
        return selected

    def output_head(self) -> str | None:
        """Qualified name of the output head (an ``nn.Linear`` outside the blocks), if any."""
        return None

    def attention_points(self) -> list[str]:
        """Names of the ``nn.Identity`` points around the attention matmuls (``q_point``,
        ``k_point``, ``probs_point``, ``v_point``): those the model defines itself (qbayes's ViT),
        else those :func:`~qbayes.models.hf_attention.add_attention_points` gives a Hugging Face
        model; ``[]`` for a model without attention."""
        from .hf_attention import add_attention_points, exposed_points

        return exposed_points(self.model) or add_attention_points(self.model)

    # ---------------------------------------------------------------------- data
    def check_batch(self, batch: Batch) -> Batch:
        """``batch`` validated (a :class:`~qbayes.errors.CalibrationError` names what is wrong)."""
        return batch

    def batches(self, data, batch_size: int | None = None, device: torch.device | str | None = None) -> list[Batch]:
        """Calibration or sensitivity data as a list of checked batches on ``device`` (default:
        the model's). With ``batch_size=None`` the data keeps its batching (a tensor is one
        batch, an iterable gives one batch per item); otherwise it is split into batches of
        ``batch_size`` samples (default: a tensor along its first dimension, an iterable as it is).
        """
        if data is None:
            raise CalibrationError("this needs calibration data: pass a tensor or an iterable of batches")
        parts = self._parts(data, _check_size(batch_size))
        out = [self.check_batch(to_device(b, self._device(device))) for b in parts]
        out = [b for b in out if batch_rows(b) > 0]
        if not out:
            raise CalibrationError("the calibration set is empty: pass at least one non-empty batch")
        return out

    def _parts(self, data, batch_size: int | None) -> list:
        if isinstance(data, torch.Tensor):
            return [data] if batch_size is None else list(data.split(batch_size))
        return list(data)

    def _device(self, device):
        if device is not None:
            return device
        p = next(self.model.parameters(), None)
        return None if p is None else p.device

    def rows(self, batch: Batch) -> int:
        """Samples in a batch."""
        return batch_rows(batch)

    def forward(self, batch: Batch):
        """Run the model on one batch; returns what the model returns."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x)

    def outputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model: per-row outputs ``f`` ``(N, C)`` of the likelihood, and the observed
        targets (``(N,)`` class indices or ``(N, C)`` values) or ``None`` if the batch has none."""
        f = self.forward(batch)
        f = f.reshape(f.shape[0], -1) if f.dim() != 2 else f
        y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        return at_least_f32(f), y

    def loss(self, batch: Batch, labels: str = "observed", generator: torch.Generator | None = None,
             reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood of the batch with its observed targets or with targets sampled
        from the model's own predictive (``labels="sampled"``), summed or averaged over rows."""
        f, y = self.outputs(batch)
        if labels == "sampled":
            y = sample_labels(self.likelihood, f, generator)
        elif labels != "observed":
            raise QBayesError(f"labels must be 'observed' or 'sampled', not {labels!r}")
        elif y is None:
            raise QBayesError(f"this {self.family} batch has no targets: use labels='sampled'")
        total = -log_likelihood(self.likelihood, f, y)
        return total / f.shape[0] if reduction == "mean" else total

    # ------------------------------------------------------------ block by block
    def block_inputs(self, batches: list[Batch]) -> list[tuple[tuple, dict]]:
        """The call arguments of the first block for every batch (the model run up to it)."""
        name, first = self.blocks()[0]
        if first is self.model:
            return [((b[0] if isinstance(b, (tuple, list)) else b,), {}) for b in batches]
        captured: list[tuple[tuple, dict]] = []

        def hook(_mod, args, kwargs):
            captured.append((args, dict(kwargs)))
            raise _Stop

        h = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for b in batches:
                try:
                    self.forward(b)
                except _Stop:
                    pass
        finally:
            h.remove()
        if len(captured) != len(batches):
            raise CalibrationError(f"the model never reached its first block {name!r} during calibration")
        return captured

    def block_output(self, out) -> torch.Tensor:
        """The hidden state a block returns (the first element of a tuple)."""
        return out[0] if isinstance(out, (tuple, list)) else out

    def next_inputs(self, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        """The next block's call arguments: this block's, with the hidden state replaced."""
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


# ---------------------------------------------------------------------------- helpers
def at_least_f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def to_device(batch: Batch, device) -> Batch:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _check_size(batch_size):
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise CalibrationError(f"batch_size must be a positive integer, not {batch_size!r}")
    return batch_size


def batch_rows(batch: Batch) -> int:
    """Samples in a batch (the first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, dict):
        return batch_rows(next(iter(batch.values()))) if batch else 0
    if isinstance(batch, (tuple, list)):
        return batch_rows(batch[0]) if batch else 0
    raise CalibrationError(f"a batch must be a tensor, a dict of tensors or an (x, y) pair, not {type(batch).__name__}")


# --------------------------------------------------------------------------- registry
ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Add an adapter class; adapters registered later are tried first (the most specific
    families before the generic ``nn.Module`` fallback)."""
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise QBayesError("register_adapter takes a ModelAdapter subclass")
    if cls not in ADAPTERS:
        ADAPTERS.insert(0, cls)
    return cls


def adapter_for(model, **options) -> ModelAdapter:
    """The adapter of ``model`` (an adapter passes through); ``options`` go to its constructor
    (e.g. ``likelihood="regression"`` for a plain module)."""
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise QBayesError(f"expected a torch nn.Module, got {type(model).__name__}")
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model, **options)
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    raise QBayesError(f"unsupported model family {mtype!r} ({type(model).__name__}): qbayes drives "
                      + "; ".join(c.drives for c in ADAPTERS if c.drives))
