"""Function-preserving rewrites applied before quantizing: each returns what it changed and
leaves the float model's outputs unchanged (tests check 1e-5 relative).

* :func:`fold_batchnorm` (``bnfold``): batch norms merged into the conv/linear before them;
* :func:`equalize` (``cle``): cross-layer equalisation of weight ranges (ReLU- and ReLU6-aware);
* :func:`absorb_high_bias` (on calibration data): DFQ's high-bias absorption, exact everywhere;
* :func:`reparameterize_layernorms` (``repq``, on calibration data): RepQ-ViT's post-LayerNorm
  scale reparameterisation;
* :func:`smooth_linears` (``smoothquant``, on calibration data, through
  ``qbayes.quantize_activations_(smoothquant=...)``): SmoothQuant's per-channel migration of
  activation outliers into the weights, with a per-layer α search;
* :func:`correct_bias` (after quantizing, against the float model): empirical bias correction.
"""
from .bias_absorb import absorb_high_bias
from .bias_correction import correct_bias
from .bn_fold import fold_batchnorm
from .cle import equalize
from .repq import reparameterize_layernorms
from .smoothquant import smooth_linears
from .graph import Chain, ChannelClip, chains

TRANSFORMS = {"bnfold": fold_batchnorm, "cle": equalize}

__all__ = ["TRANSFORMS", "absorb_high_bias", "correct_bias", "Chain", "ChannelClip", "chains", "equalize", "fold_batchnorm", "reparameterize_layernorms", "smooth_linears"]
