r"""Sentence embeddings of a text encoder, and how close two encoders' embeddings are.

A sentence's embedding is the sentence-transformers recipe: the encoder's last hidden states
averaged over the attention mask (mean pooling), then L2-normalised,

.. math:: e = \frac{\bar h}{\lVert \bar h \rVert}, \qquad \bar h = \frac{\sum_t m_t h_t}{\sum_t m_t},

so the cosine between two models' embeddings of one sentence is their dot product. Sentences
are cut at ``max_length`` tokens (special tokens included).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import QBayesError


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, sentences: Sequence[str], max_length: int = 128,
                        batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """``(len(sentences), hidden)`` float32 unit-norm mean-pooled embeddings."""
    if not sentences:
        raise QBayesError("sentence_embeddings: no sentences given")
    device = next(model.parameters()).device
    out = []
    chunks = range(0, len(sentences), batch_size)
    for i in tqdm(chunks, desc="embeddings", unit="batch", disable=not progress):
        enc = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        out.append(nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1).cpu())
    return torch.cat(out)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden`` ``(batch, seq, d)`` over the positions where ``mask`` ``(batch, seq)`` is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def cosine_to_reference(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine between two sets of embeddings of the same sentences (``(n,)``)."""
    if reference.shape != other.shape:
        raise QBayesError(f"embeddings of different shapes: {tuple(reference.shape)} vs {tuple(other.shape)}")
    return nn.functional.cosine_similarity(reference.double(), other.double(), dim=-1)
