"""The closed-form sensitivity criteria in one namespace: each lives in its own module
(:mod:`.hawq`, :mod:`.fisher`, :mod:`.output`, :mod:`.posterior`), and :mod:`.pqi` and
:mod:`.measured` need passes over the model. Each gives the predicted increase of the mean loss
when one layer's weight ``W`` becomes ``W + ΔW``.
"""
from .fisher import fisher
from .hawq import hawq
from .output import output
from .posterior import posterior, prior_precision
from ..curvature import LayerStatistics

CLOSED_FORM = ("hawq", "fisher", "output", "posterior")

__all__ = ["CLOSED_FORM", "LayerStatistics", "fisher", "hawq", "output", "posterior", "prior_precision"]
