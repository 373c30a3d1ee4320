"""Evaluation metrics."""
from .accuracy import top1
from .embedding import cosine_to_reference, mean_pool, sentence_embeddings
from .perplexity import perplexity

__all__ = ["cosine_to_reference", "mean_pool", "perplexity", "sentence_embeddings", "top1"]
