"""Adapter for Hugging Face decoder-only language models.

Knows where each family keeps its stack of decoder blocks; everything else (which linears a
block has, in which order they run, which share an input) is discovered by running the block.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QBayesError

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


@dataclass
class DecoderAdapter:
    """Where the blocks of a decoder LM are. ``blocks_path`` is relative to the model root."""

    model: nn.Module
    family: str
    blocks_path: str

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    def block_name(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"


def adapter_for(model: nn.Module) -> DecoderAdapter:
    """Pick the adapter from ``model.config.model_type``; refuse families we cannot drive."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype in BLOCK_PATHS:
        path = BLOCK_PATHS[mtype]
        try:
            model.get_submodule(path)
        except AttributeError:
            raise QBayesError(f"{mtype} model has no {path!r}: pass the *ForCausalLM model") from None
        return DecoderAdapter(model, mtype, path)
    if mtype == "gpt2":
        raise QBayesError("GPT-2 stores its projections as transformers' Conv1D, not nn.Linear; "
                          "it is not supported yet (Llama-family and OPT are)")
    raise QBayesError(f"unsupported model family {mtype!r}: supported are {sorted(BLOCK_PATHS)}")


def load_causal_lm(path_or_id: str, dtype: torch.dtype = torch.float32):
    """Load a Hugging Face causal LM and its tokenizer from a local folder (or a hub id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path_or_id)
    except OSError as e:
        raise QBayesError(f"cannot load model {path_or_id!r}: {e}") from e
    model.eval()
    model.config.use_cache = False
    return model, tok
