"""Evaluation metrics."""
from .accuracy import top1
from .embedding import cosine_to_reference, mean_pool, sentence_embeddings
from .image_metrics import frechet_distance, frechet_distance_from_moments, kid, precision_recall, psnr, ssim
from .perplexity import perplexity

__all__ = ["cosine_to_reference", "mean_pool", "perplexity", "sentence_embeddings", "top1"]
__all__ += ["frechet_distance", "frechet_distance_from_moments", "kid", "precision_recall", "psnr", "ssim"]
from .sliced_wasserstein import random_directions, sliced_wasserstein

__all__ += ["random_directions", "sliced_wasserstein"]
