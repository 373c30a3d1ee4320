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
* :func:`add_noisy_bias` (on calibration data, after the activation ranges are frozen):
  NoisyQuant's fixed per-channel noisy bias in front of activation quantizers, with a per-layer
  amplitude search (function-preserving in float: the quantizer removes the noise it adds);
* :func:`split_lowrank_` (before quantizing): SVDQuant's float low-rank branch, the residual
  left for the weight quantizer;
* :func:`correct_bias` (after quantizing, against the float model): empirical bias correction;
* :func:`expected_inputs` (on the float model, before ``bnfold``) and :func:`correct_bias_analytic`
  (after quantizing): data-free bias correction from the BatchNorm parameters.
"""
from .bias_absorb import absorb_high_bias
from .bias_correction import correct_bias
from .bias_correction_analytic import correct_bias_analytic, expected_inputs
from .bn_fold import fold_batchnorm
from .cle import equalize
from .noisyquant import add_noisy_bias
from .lowrank import lowrank_factors, split_lowrank_
from .repq import reparameterize_layernorms
from .smoothquant import smooth_linears
from .graph import Chain, ChannelClip, chains

TRANSFORMS = {"bnfold": fold_batchnorm, "cle": equalize}

__all__ = ["TRANSFORMS", "absorb_high_bias", "lowrank_factors", "split_lowrank_", "add_noisy_bias", "correct_bias", "correct_bias_analytic", "Chain",
           "ChannelClip", "chains", "equalize", "expected_inputs", "fold_batchnorm", "reparameterize_layernorms",
           "smooth_linears"]
