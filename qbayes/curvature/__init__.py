"""Curvature engine: layer statistics shared by solvers, bit allocation and Laplace.

* :class:`InputSecondMoment`: ``H = (2/n) Σ x xᵀ`` of a layer's inputs (GPTQ's Hessian, K-FAC's
  input factor);
* :mod:`.ggn`: per-sample Jacobians, GGN and empirical Fisher (full or diagonal);
* :mod:`.kfac`: Kronecker factors of linear layers;
* :mod:`.hutchinson`: stochastic traces of the loss Hessian per parameter block (HAWQ).
"""
from .ggn import ef_batch, flatten, ggn_batch, jacobians, mc_fisher_batch, output_hessian_sqrt, sample_labels, unflatten
from .hutchinson import TraceEstimate, exact_block_traces, hutchinson_trace
from .input_stats import InputSecondMoment
from .kfac import KronFactors, kfac_factors

__all__ = ["InputSecondMoment", "TraceEstimate", "exact_block_traces", "hutchinson_trace", "KronFactors", "kfac_factors", "ef_batch", "flatten", "ggn_batch", "jacobians", "mc_fisher_batch", "sample_labels",
           "output_hessian_sqrt", "unflatten"]
