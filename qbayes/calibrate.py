"""Sequential layer-wise calibration over the blocks of a model (any model an adapter drives).

1. The first block's inputs are captured once, for all calibration batches (the model's
   adapter runs it up to there; a model without repeated blocks is one block).
2. Within a block the linears are visited in forward order, grouped into *stages* of linears
   that read the same input tensor (q/k/v, then o, then gate/up, then down in a Llama block).
   For each stage ``H`` is accumulated from the inputs produced by the already-quantized
   linears before it, the stage is solved, and its linears compute with their quantized
   weights from then on ("true sequential").
3. The quantized block's outputs become the next block's inputs. Only one block's activations
   are alive at a time.

With the solver option ``float_targets=True`` (:mod:`qbayes.algorithms.float_targets`) a second,
float stream runs beside the quantized one: each block is first run in float on the float
stream's inputs, the input of every stage is kept, and each stage is fit to the float outputs
(through the cross moment of the float and quantized inputs) rather than to what the float
weights compute on the quantized inputs. That keeps one block's float stage inputs alive too.

Every calibration batch runs its block forward as a coroutine (a greenlet) that pauses at the
first linear of each stage. When all batches are paused there, their inputs give ``H``, the
stage is solved, and the batches resume. So each block costs one forward pass, whatever the
number of stages, and no code needs to know the block's internals.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import Solver, layer_objective
from .algorithms.float_targets import float_target_weight
from .curvature import InputCrossMoment, collect, grouped_conv_moment
from .errors import CalibrationError
from .formats import PER_TENSOR, QuantizedWeight
from .models import adapter_for
from .nn import packed_like, set_module, weight_matrix
from .spec import QuantSpec

log = logging.getLogger(__name__)

SpecFor = Callable[[str], QuantSpec]


def discover_stages(block: nn.Module, linears: Mapping[str, nn.Module], args: tuple, kwargs: dict):
    """Run ``block`` once; return its linears in forward order grouped by shared input tensor,
    and the linears that never ran."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [linears[n].register_forward_pre_hook(lambda m, a, n=n: order.append((n, a[0]))) for n in linears]
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    last, seen = None, set()
    for name, x in order:
        if name in seen:
            continue
        seen.add(name)
        if stages and x is last:
            stages[-1].append(name)
        else:
            stages.append([name])
            last = x
    return stages, [n for n in linears if n not in seen]


def interleaved_forward(block: nn.Module, inputs: list[tuple[tuple, dict]], stages: list[list[str]],
                        on_stage: Callable[[int, list[torch.Tensor]], None],
                        output: Callable = lambda out: out[0] if isinstance(out, (tuple, list)) else out
                        ) -> list[torch.Tensor]:
    """Run ``block`` on every batch, pausing all batches at the first linear of each stage.

    ``on_stage(k, xs)`` receives that linear's input from every batch; when it returns, the
    batches resume, so whatever it changes (the stage's weights) is what they compute with.
    Returns the block outputs per batch (``output`` picks the hidden state from what the block returns).
    """
    from greenlet import getcurrent, greenlet  # here, not at import: only calibration needs it

    main = getcurrent()
    paused: set[tuple[int, int]] = set()

    def pause(k):
        def hook(_mod, a):
            key = (id(getcurrent()), k)
            if key not in paused:  # a module called twice pauses once
                paused.add(key)
                main.switch(("pause", k, a[0]))
        return hook

    handles = [block.get_submodule(stage[0]).register_forward_pre_hook(pause(k)) for k, stage in enumerate(stages)]
    workers = [greenlet(lambda a, kw: ("done", output(block(*a, **kw)))) for _ in inputs]
    try:
        events = [w.switch(a, kw) for w, (a, kw) in zip(workers, inputs)]
        for k in range(len(stages)):
            if any(ev[0] != "pause" or ev[1] != k for ev in events):
                raise CalibrationError(f"calibration batches did not all reach stage {stages[k]} of the block")
            on_stage(k, [ev[2] for ev in events])
            events = [w.switch() for w in workers]
        if any(ev[0] != "done" for ev in events):
            raise CalibrationError("a calibration batch paused again after the last stage")
        return [ev[1] for ev in events]
    finally:
        for h in handles:
            h.remove()
        for w in workers:
            if not w.dead:
                w.throw()  # unwind a paused forward (GreenletExit)


def quantize_blocks(
    adapter,
    batches: list,
    selected: Mapping[str, nn.Linear],
    spec_for: SpecFor,
    solver: Solver,
    options: dict,
    progress: bool = True,
) -> dict[str, dict]:
    """Quantize the ``selected`` linears (qualified names) block by block through ``adapter``
    (a :class:`qbayes.models.ModelAdapter`) on its calibration ``batches``; return a per-layer report."""
    if not batches:
        raise CalibrationError("the calibration set is empty: pass at least one calibration batch")
    report: dict[str, dict] = {}
    plans: dict[tuple, tuple] = {}
    options = dict(options)
    float_targets = bool(options.pop("float_targets", False))
    if float_targets and any(isinstance(m, nn.Conv2d) for m in selected.values()):
        raise CalibrationError("float_targets supports linear layers only: leave it off for models with convolutions")
    if float_targets and "damp" not in options:
        options["damp"] = inspect.signature(solver.fn).parameters["damp"].default
    with torch.no_grad():
        inputs = adapter.block_inputs(batches)
        f_inputs = inputs  # the float stream (float_targets): identical until a block is quantized
        blocks = adapter.blocks()
        bar = tqdm(blocks, desc=f"{solver.fn.__name__.upper()} blocks", unit="block", disable=not progress)
        for bname, block in bar:
            prefix = f"{bname}." if bname else ""
            linears = {n[len(prefix):]: m for n, m in selected.items() if n.startswith(prefix)}
            if not linears:  # nothing to quantize here: just run it for the next block's inputs
                outputs = [adapter.block_output(block(*a, **k)) for a, k in inputs]
                f_outputs = [adapter.block_output(block(*a, **k)) for a, k in f_inputs] if float_targets else None
            else:
                key = (type(block), tuple(linears))
                if key not in plans:  # identical blocks run their linears in the same order
                    plans[key] = discover_stages(block, linears, *inputs[0])
                stages, never = plans[key]
                for n in never:
                    log.warning("%s%s never ran on the calibration data; it is left in float", prefix, n)
                solved: dict[str, tuple[QuantizedWeight, QuantSpec]] = {}
                if float_targets:  # run while the block is still float
                    f_stage_x, f_outputs = float_pass(block, f_inputs, stages, adapter.block_output)

                def on_stage(k, xs):
                    Hs = _stage_moments(stages[k], linears, xs)
                    C = None
                    if float_targets:
                        H = Hs[stages[k][0]]  # linears only: one input, one H
                        acc = InputCrossMoment(H.shape[0], dtype=H.dtype, device=H.device)
                        for fx, x in zip(f_stage_x, xs):
                            acc.update(fx.pop(k), x)
                        C = acc.C
                    solved.update(_solve_stage(prefix, stages[k], linears, Hs, spec_for, solver, options, report, C))

                outputs = interleaved_forward(block, inputs, stages, on_stage, adapter.block_output)
                for n, (qw, spec) in solved.items():
                    set_module(block, n, packed_like(linears[n], qw, spec))
            inputs = [adapter.next_inputs(a, k, h) for (a, k), h in zip(inputs, outputs)]
            if float_targets:
                f_inputs = [adapter.next_inputs(a, k, h) for (a, k), h in zip(f_inputs, f_outputs)]
    return report


def float_pass(block: nn.Module, inputs: list[tuple[tuple, dict]], stages: list[list[str]], output: Callable):
    """Run the (still float) ``block`` on every batch; return, per batch, ``{stage k: the input of
    its first linear}`` (the first call, as :func:`interleaved_forward` pauses once) and the outputs."""
    captured: list[dict[int, torch.Tensor]] = []

    def keep(k):
        def hook(_mod, a):
            captured[-1].setdefault(k, a[0])
        return hook

    handles = [block.get_submodule(stage[0]).register_forward_pre_hook(keep(k)) for k, stage in enumerate(stages)]
    outputs = []
    try:
        for a, kw in inputs:
            captured.append({})
            outputs.append(output(block(*a, **kw)))
    finally:
        for h in handles:
            h.remove()
    return captured, outputs


def _geometry(layer: nn.Module) -> tuple:
    """Layers of one stage with equal geometry read the same rows, so share one ``H``."""
    if isinstance(layer, nn.Conv2d):
        return ("conv", layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups)
    return ("linear",)


def _stage_moments(stage, linears, xs) -> dict:
    """``{name: H}`` for a stage's layers from their shared inputs ``xs``: one ``H`` per geometry,
    ``(groups, d, d)`` for a grouped convolution (each group reads its own channels)."""
    out, cache = {}, {}
    for n in stage:
        layer, key = linears[n], _geometry(linears[n])
        if key not in cache:
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                cache[key] = grouped_conv_moment(layer, xs)
            else:
                cache[key] = collect(adapter_for(layer), {"x": layer}, xs, want=("H",), stop_early=True)["x"].H
        out[n] = cache[key]
    return out


def _solve(solver, W, H, spec, options):
    """``solver`` on ``W`` against ``H``; a stack of per-group ``H`` solves each group's rows alone."""
    if H.dim() == 2:
        return solver.fn(W, H, spec, **options)
    if spec.group_size == PER_TENSOR:
        raise CalibrationError("a grouped convolution has one H per group of channels, so one per-tensor scale "
                               "cannot be solved across it: quantize it per channel (group_size=-1) or by RTN")
    rows = W.shape[0] // H.shape[0]
    parts = [solver.fn(W[g * rows:(g + 1) * rows], H[g], spec, **options) for g in range(H.shape[0])]
    return QuantizedWeight(*_cat(parts), spec.bits, spec.group_size, spec.symmetric, spec.format)


def _objective(w, Q, H):
    """The layer objective; with per-group ``H`` the sum over the groups of output channels."""
    if H.dim() == 2:
        return layer_objective(w, Q, H)
    r = w.shape[0] // H.shape[0]
    return sum(layer_objective(w[g * r:(g + 1) * r], Q[g * r:(g + 1) * r], H[g]) for g in range(H.shape[0]))


def _cat(parts):
    return tuple(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero"))


def _solve_stage(prefix, stage, linears, Hs, spec_for, solver, options, report, C=None):
    """Solve the layers of one stage against their ``H`` (``Hs[name]``; same-spec, same-geometry
    layers stacked by rows, which GPTQ treats independently), and make them compute with the
    result. With the float/quantized cross moment ``C`` the solver is given the float-target
    weight instead."""
    by_spec: dict[tuple, list[str]] = {}
    for n in stage:
        spec = spec_for(prefix + n)  # a per-tensor scale belongs to one layer: never stacked
        key = (spec, n if spec.group_size == PER_TENSOR or Hs[n].dim() == 3 else None, _geometry(linears[n]))
        by_spec.setdefault(key, []).append(n)
    out = {}
    for (spec, _, _), names in by_spec.items():
        H = Hs[names[0]]
        W = torch.cat([weight_matrix(linears[n]).detach() for n in names], 0)
        if C is not None:
            W = float_target_weight(W, H, C, options["damp"])
        qw = _solve(solver, W, H, spec, options)
        parts = qw.split_rows([weight_matrix(linears[n]).shape[0] for n in names]) if len(names) > 1 else [qw]
        for n, part in zip(names, parts):
            lin = linears[n]
            w = weight_matrix(lin).detach()
            Q = part.dequantize(lin.weight.dtype)
            err, ref = _objective(w, Q, H), _objective(w, torch.zeros_like(Q), H)
            report[prefix + n] = {"rel_error": float(err / ref) if ref > 0 else 0.0}
            lin.weight.data = Q.view_as(lin.weight)  # identical to what the packed module built from `part` computes
            out[n] = (part, spec)
    return out
