"""A recipe of named rewrites around quantization: the function-preserving rewrites, in order,
before quantizing (:func:`apply_rewrites`), and the bias corrections after it (:func:`run_recipe`
does both around the caller's quantization)."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import QBayesError
from .bias_absorb import absorb_high_bias
from .bn_fold import fold_batchnorm
from .cle import equalize
from .repq import reparameterize_layernorms

#: rewrites that need no data / that read calibration batches
STATIC = {"bnfold": fold_batchnorm, "cle": equalize}
WITH_DATA = {"absorb": absorb_high_bias, "repq": reparameterize_layernorms}
#: steps of a recipe that are not pre-quantization rewrites (the bias corrections run after quantizing,
#: SmoothQuant and NoisyQuant inside quantize_activations_)
CORRECTIONS = ("biascorr", "biascorr-analytic")
LATER = (*CORRECTIONS, "smoothquant", "noisyquant")


def apply_rewrites(model: nn.Module, names: Sequence[str], calib: torch.Tensor | None = None,
                   batch_size: int = 100) -> list[str]:
    """Run each rewrite of ``names`` that belongs before quantizing, in order; return those run."""
    done = []
    for name in names:
        if name in STATIC:
            STATIC[name](model)
        elif name in WITH_DATA:
            if calib is None:
                raise QBayesError(f"the {name!r} rewrite measures the model on calibration data: pass calib")
            WITH_DATA[name](model, calib.split(batch_size))
        elif name not in LATER:
            raise QBayesError(f"unknown rewrite {name!r}: choose from {', '.join([*STATIC, *WITH_DATA, *LATER])}")
        else:
            continue
        done.append(name)
    return done


def run_recipe(model: nn.Module, names: Sequence[str], calib: torch.Tensor | None, quantize: Callable[[], None],
               batch_size: int = 100, progress: bool = True) -> None:
    """Rewrite ``model`` as ``names`` say, run ``quantize()`` (the caller's activation and weight
    quantization, in place), then the bias corrections named: ``biascorr`` (empirical, on
    ``calib``, :func:`~qbayes.transforms.correct_bias`) and ``biascorr-analytic`` (DFQ's
    closed form from the batch norms, :func:`~qbayes.transforms.correct_bias_analytic`: its input
    means are read before the rewrites fold the norms away), each against the float model as
    rewritten."""
    from .bias_correction import correct_bias
    from .bias_correction_analytic import correct_bias_analytic, expected_inputs

    expected = None
    if "biascorr-analytic" in names:
        if "cle" in names:
            raise QBayesError("biascorr-analytic reads the input means from the batch norms before the rewrites, "
                              "and cle rescales those channels afterwards: use biascorr (empirical) with cle")
        expected = expected_inputs(model)
    apply_rewrites(model, names, calib, batch_size)
    reference = copy.deepcopy(model) if any(n in CORRECTIONS for n in names) else None
    quantize()
    if "biascorr-analytic" in names:
        correct_bias_analytic(model, reference, expected)
    if "biascorr" in names:
        if calib is None:
            raise QBayesError("the biascorr correction measures the model on calibration data: pass calib")
        correct_bias(model, reference, calib.split(batch_size), progress=progress)
