"""Curvature engine: layer statistics shared by solvers, bit allocation and Laplace.

* :func:`collect`: one pass over a model (through its adapter) gathering, per layer, the input
  second moment ``H`` (GPTQ's Hessian, K-FAC's input factor), the output-gradient factor ``G``,
  diagonal GGN / empirical Fisher and activation ranges; every client calls it;
* :class:`InputSecondMoment`: the running ``H = (2/n) Σ x xᵀ`` it accumulates with, and
  :class:`InputCrossMoment` the float/quantized cross moment of float-target calibration;
* :mod:`.kron`: the Kronecker-factored algebra (quadratic forms, eigenbases, sampling);
* :mod:`.ggn`: per-sample Jacobians, GGN and empirical Fisher (full or diagonal), likelihoods;
* :mod:`.hutchinson`: stochastic traces of the loss Hessian per parameter block (HAWQ).
"""
from .collect import Collection, LayerStatistics, collect
from .ggn import ef_batch, flatten, ggn_batch, jacobians, mc_fisher_batch, output_hessian_sqrt, sample_labels, unflatten
from .hutchinson import TraceEstimate, exact_block_traces, hutchinson_trace
from .input_stats import InputCrossMoment, InputSecondMoment, grouped_conv_moment
from .kron import KronEig, KronFactors

__all__ = ["Collection", "InputCrossMoment", "InputSecondMoment", "KronEig", "KronFactors", "LayerStatistics", "TraceEstimate", "collect", "grouped_conv_moment",
           "ef_batch", "exact_block_traces", "flatten", "ggn_batch", "hutchinson_trace", "jacobians",
           "mc_fisher_batch", "output_hessian_sqrt", "sample_labels", "unflatten"]
