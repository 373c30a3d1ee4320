"""Adapter for Hugging Face decoder-only language models.

Knows where each family keeps its stack of decoder blocks; everything else (which linears a
block has, in which order they run, which share an input) is discovered by running the block.
A batch is a ``(batch, seqlen)`` tensor of token ids; the likelihood is next-token
classification over the vocabulary (row ``t`` of the outputs predicts token ``t + 1``).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import CalibrationError, QBayesError
from .adapter import ModelAdapter, at_least_f32, register_adapter
from .zoo import load_pretrained

log = logging.getLogger(__name__)

# model_type -> dotted path of the ModuleList of decoder blocks
BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "smollm3": "model.layers",
    "opt": "model.decoder.layers",
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


@register_adapter
class DecoderAdapter(ModelAdapter):
    """Hugging Face ``*ForCausalLM`` models of the families in :data:`BLOCK_PATHS`."""

    likelihood = "classification"
    drives = "decoder LMs " + ", ".join(sorted(BLOCK_PATHS))

    def __init__(self, model: nn.Module):
        super().__init__(model)
        mtype = _model_type(model)
        if mtype == "gpt2":
            raise QBayesError("GPT-2 stores its projections as transformers' Conv1D, not nn.Linear; "
                              "it is not supported yet (Llama-family and OPT are)")
        if mtype not in BLOCK_PATHS:
            raise QBayesError(f"unsupported model family {mtype!r}: supported are {sorted(BLOCK_PATHS)}")
        path = BLOCK_PATHS[mtype]
        try:
            model.get_submodule(path)
        except AttributeError:
            raise QBayesError(f"{mtype} model has no {path!r}: pass the *ForCausalLM model") from None
        self.family, self.blocks_path = mtype, path

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        mtype = _model_type(model)
        return mtype in BLOCK_PATHS or (mtype == "gpt2" and hasattr(model, "lm_head"))

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"{self.blocks_path}.{i}", b) for i, b in enumerate(self.model.get_submodule(self.blocks_path))]

    def output_head(self) -> str | None:
        out = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return next((n for n, m in self.model.named_modules() if m is out), None) if isinstance(out, nn.Linear) else None

    def check_batch(self, batch) -> torch.Tensor:
        if isinstance(batch, torch.Tensor) and batch.numel() == 0:
            return batch.reshape(0, 0)
        if not isinstance(batch, torch.Tensor) or batch.dtype not in (torch.int64, torch.int32):
            raise CalibrationError("calibration data of a language model must be integer token ids")
        if batch.dim() == 1:
            batch = batch.unsqueeze(0)
        if batch.dim() != 2:
            raise CalibrationError(f"token ids must have shape (batch, seqlen), got {tuple(batch.shape)}")
        return batch.long()

    def _parts(self, data, batch_size: int | None) -> list:
        """Token ids ``(n, seqlen)`` or an iterable of 1-D/2-D id tensors. With a batch size,
        every sequence is stacked (all must share one length) and split into batches of that
        many sequences; without one, each tensor is a batch as given."""
        if batch_size is None:
            return [data] if isinstance(data, torch.Tensor) else list(data)
        if isinstance(data, torch.Tensor):
            seqs = [data] if data.dim() == 1 else list(data)
        else:
            seqs = [s for c in data for s in ([c] if isinstance(c, torch.Tensor) and c.dim() == 1 else list(c))]
        seqs = [s for s in seqs if s.numel() > 0]
        if not seqs:
            raise CalibrationError("the calibration set is empty: pass at least one non-empty sequence of token ids")
        if any(not isinstance(s, torch.Tensor) or s.dtype not in (torch.int64, torch.int32) for s in seqs):
            raise CalibrationError("calibration data must be integer token ids")
        lengths = {s.numel() for s in seqs}
        if len(lengths) != 1:
            raise CalibrationError(f"calibration sequences must share one length, got {sorted(lengths)}")
        return list(torch.stack(seqs).long().split(batch_size))

    def forward(self, batch: torch.Tensor):
        return self.model(input_ids=batch, use_cache=False)

    def outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.shape[1] < 2:
            raise CalibrationError("next-token outputs need sequences of at least 2 tokens")
        logits = self.forward(batch).logits
        return at_least_f32(logits[:, :-1].reshape(-1, logits.shape[-1])), batch[:, 1:].reshape(-1)


def load_causal_lm(path_or_id: str, dtype: torch.dtype = torch.float32):
    """Load a Hugging Face causal LM and its tokenizer from a local folder (or a hub id)."""
    model, tok = load_pretrained("AutoModelForCausalLM", path_or_id, dtype)
    model.config.use_cache = False
    return model, tok
