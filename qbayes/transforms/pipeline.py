"""Apply the named function-preserving rewrites of a recipe, in order, before quantizing."""
from __future__ import annotations

from typing import Sequence

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
#: steps of a recipe that are not pre-quantization rewrites (bias correction runs after quantizing,
#: SmoothQuant inside quantize_activations_)
LATER = ("biascorr", "smoothquant")


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
