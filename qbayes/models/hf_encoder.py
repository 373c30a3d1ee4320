"""Adapter for Hugging Face encoders: BERT-style text encoders and vision transformers.

A batch is a dict of tensors (``input_ids``, ``attention_mask``, ``token_type_ids``,
``labels`` for text; ``pixel_values`` and ``labels`` for images); a bare tensor is taken as the
token ids (text) or the pixels (vision). The likelihood follows the model's head: a model with
``logits`` (a classifier, a masked-LM head) is classification over them, with ``labels`` as
the observed targets; a bare encoder (a sentence-embedding model) is a unit-variance Gaussian
on its token embeddings (``last_hidden_state`` at the unmasked positions), which has no
observed targets, only sampled ones: its Fisher is the output-space second moment of the
embedding, the natural curvature for a model judged by how well it keeps its embeddings.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import CalibrationError, QBayesError
from .adapter import ModelAdapter, at_least_f32, batch_rows, register_adapter
from .zoo import load_pretrained

log = logging.getLogger(__name__)

# model_type -> candidate paths of the ModuleList of encoder blocks, relative to the base model
# (transformers 5 keeps ViT's blocks in ``layers``; older releases in ``encoder.layer``)
ENCODER_PATHS = {
    "bert": ("encoder.layer",),
    "roberta": ("encoder.layer",),
    "xlm-roberta": ("encoder.layer",),
    "electra": ("encoder.layer",),
    "vit": ("layers", "encoder.layer"),
    "deit": ("layers", "encoder.layer"),
    "distilbert": ("transformer.layer",),
}
VISION = ("vit", "deit")
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "position_ids")
VISION_KEYS = ("pixel_values", "labels")


def _get(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


@register_adapter
class EncoderAdapter(ModelAdapter):
    """Hugging Face encoders of the families in :data:`ENCODER_PATHS` (base models or with a head)."""

    drives = "encoders " + ", ".join(sorted(ENCODER_PATHS))

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.family = _model_type(model)
        base = getattr(model, "base_model", model)
        prefix = next((n for n, m in model.named_modules() if m is base), "")
        paths = [f"{prefix}.{p}" if prefix else p for p in ENCODER_PATHS[self.family]]
        found = [p for p in paths if isinstance(_get(model, p), nn.ModuleList)]
        if not found:
            raise QBayesError(f"{self.family} model has no block list at {paths}")
        self.blocks_path = found[0]
        self.vision = self.family in VISION
        self.has_head = base is not model
        self.likelihood = "classification" if self.has_head else "regression"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _model_type(model) in ENCODER_PATHS

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"{self.blocks_path}.{i}", b) for i, b in enumerate(self.model.get_submodule(self.blocks_path))]

    def check_batch(self, batch):
        keys = VISION_KEYS if self.vision else TEXT_KEYS
        if isinstance(batch, torch.Tensor):
            batch = {keys[0]: batch}
        if not isinstance(batch, dict) or keys[0] not in batch:
            raise CalibrationError(f"a {self.family} batch is a dict with {keys[0]!r} (or that tensor alone)")
        unknown = set(batch) - set(keys)
        if unknown:
            raise CalibrationError(f"unknown {self.family} batch entries {sorted(unknown)}: expected some of {keys}")
        mask = batch.get("attention_mask")
        if mask is not None and not self.vision and not getattr(self, "_warned_padding", False) and (mask == 0).any():
            self._warned_padding = True
            log.warning("a %s batch is padded: its padded positions enter the layers' input statistics like real "
                        "tokens; qbayes.data.encoder_windows gives unpadded windows of text", self.family)
        main = batch[keys[0]]
        if self.vision and (not main.is_floating_point() or main.dim() != 4):
            raise CalibrationError(f"pixel_values must be float images (batch, channels, height, width), got "
                                   f"{main.dtype} {tuple(main.shape)}")
        if not self.vision and (main.is_floating_point() or main.dim() != 2):
            raise CalibrationError(f"input_ids must be integer token ids (batch, seqlen), got {main.dtype} "
                                   f"{tuple(main.shape)}")
        return batch

    def _parts(self, data, batch_size: int | None) -> list:
        """A dict of stacked tensors (a tokenizer's output; split into batches of ``batch_size``
        rows), a tensor of token ids or pixels, or an iterable of batch dicts (taken as they are)."""
        if isinstance(data, torch.Tensor) or hasattr(data, "keys"):
            whole = self.check_batch(dict(data) if hasattr(data, "keys") else data)
            if batch_size is None:
                return [whole]
            n = batch_rows(whole)
            return [{k: v[i:i + batch_size] for k, v in whole.items()} for i in range(0, n, batch_size)]
        return [dict(b) if hasattr(b, "keys") else b for b in data]

    def forward(self, batch: dict):
        return self.model(**{k: v for k, v in batch.items() if k != "labels"})

    def outputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.forward(batch)
        y = batch.get("labels")
        if self.has_head:
            logits = at_least_f32(out.logits)
            f = logits.reshape(-1, logits.shape[-1])
            if y is not None:
                y = y.reshape(-1)
                keep = y != -100  # masked-LM / token-classification convention: ignored positions
                f, y = f[keep], y[keep]
            return f, y
        hidden = at_least_f32(out.last_hidden_state)
        mask = batch.get("attention_mask")
        if mask is not None and not self.vision:
            return hidden[mask.bool()], None
        return hidden.reshape(-1, hidden.shape[-1]), None


def load_encoder(path_or_id: str, dtype: torch.dtype = torch.float32):
    """Load a Hugging Face encoder (``AutoModel``) and its tokenizer from a local folder or hub id."""
    return load_pretrained("AutoModel", path_or_id, dtype)
