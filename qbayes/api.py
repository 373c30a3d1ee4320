"""One-call entry point: ``quantize_(model, spec, method, calib)``, in the spirit of torchao."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import get_solver
from .calibrate import quantize_blocks
from .errors import CalibrationError, QBayesError
from .formats import group_view
from .models import ModelAdapter, adapter_for
from .models.hf_attention import SOFTMAX_POINTS
from .nn import (DEFAULT_EXCLUDE, QuantConv2d, QuantLinear, check_conv, check_selection, name_filter, packed_like,
                 set_module, weight_matrix)
from .nn.act_quant import ActQuant, quantize_inputs
from .nn.int8_linear import to_int8_  # noqa: F401 - the front door's third verb: run W8A8 in integers
from .spec import ActSpec, QuantSpec

log = logging.getLogger(__name__)

#: the layers ``quantize_`` packs (``QuantLinear`` / ``QuantConv2d``)
LAYER_KINDS = (nn.Linear, nn.Conv2d)
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quantize_(
    model: nn.Module | ModelAdapter,
    spec: QuantSpec | Mapping[str, QuantSpec] | Callable[[str], QuantSpec] = QuantSpec(),
    method: str = "gptq",
    calib=None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = DEFAULT_EXCLUDE,
    float_dtype: str = "float16",
    batch_size: int = 8,
    progress: bool = True,
    head: QuantSpec | None = None,
    convs: bool = False,
    **options,
) -> nn.Module:
    """Quantize the linear and convolution layers of ``model`` in place and return it.

    Args:
        model: a float model a :mod:`qbayes.models` adapter drives (a Hugging Face decoder LM
            of the Llama family or OPT, a BERT/ViT encoder, a plain ``nn.Module`` such as a
            CNN), or an adapter.
        spec: one :class:`QuantSpec` for every layer, a ``{name: spec}`` mapping, or a function
            of the layer name.
        method: a solver from :data:`qbayes.algorithms.SOLVERS` (``"rtn"``, ``"gptq"``, ``"adaround"``).
        calib: calibration data in the adapter's batch language, needed by solvers that use the
            layer statistic ``H``: token ids ``(n_samples, seqlen)`` for a decoder LM, a dict of
            tensors (a tokenizer's output) or pixels for an encoder, a tensor of inputs or
            ``(x, y)`` batches for a plain module.
        include, exclude: glob patterns over qualified module names; by default every
            ``nn.Linear`` and ``nn.Conv2d`` inside the model's blocks except embeddings and ``lm_head``.
        float_dtype: precision kept by the parameters left in float (they are rounded to it
            here, so the saved checkpoint reloads bit-identically).
        batch_size: calibration sequences per forward pass.
        head: also pack the output head (``lm_head``, untying it from the input embeddings, which
            stay in float for the lookup) with this spec, by round-to-nearest. At batch 1 the
            head of a small LM is its largest single read per token.
        convs: also quantize the ``nn.Conv2d`` layers (as ``QuantConv2d``; their weight matrix is
            ``(out, in/groups · kh · kw)``, so a group size must divide that, or use -1 per channel).
        **options: solver options (GPTQ: ``act_order``, ``damp``, ``block_size``).

    The model gains a ``qbayes_config`` dict describing what was done (read by
    :func:`qbayes.io.save_quantized`).
    """
    solver = get_solver(method)
    unknown = set(options) - set(solver.options)
    if unknown:
        raise QBayesError(f"method {method!r} takes no option(s) {sorted(unknown)}; it takes {list(solver.options)}")
    if float_dtype not in FLOAT_DTYPES:
        raise QBayesError(f"float_dtype must be one of {tuple(FLOAT_DTYPES)}, not {float_dtype!r}")
    spec_for = _spec_function(spec)
    adapter = adapter_for(model)
    model = adapter.model
    selected = adapter.select(spec_for, include, exclude, kinds=LAYER_KINDS if convs else (nn.Linear,))
    _check_convs(selected)
    spec_for = _representable_scales(spec_for, selected)
    head_name = _check_head(adapter, head) if head is not None else None

    batches = adapter.batches(calib, batch_size, _device_of(model)) if solver.needs_hessian else None

    t0 = time.perf_counter()
    _round_float_params(model, set(selected) | ({head_name} if head_name else set()), FLOAT_DTYPES[float_dtype])
    if batches is not None:
        report = quantize_blocks(adapter, batches, selected, spec_for, solver, options, progress=progress)
    else:
        report = {}
        for name, lin in tqdm(selected.items(), desc=f"{method.upper()} layers", disable=not progress):
            s = spec_for(name)
            qw = solver.fn(weight_matrix(lin).detach(), None, s, **options)
            set_module(model, name, packed_like(lin, qw, s))
            report[name] = {"bits": s.bits}
    if head_name is not None:
        lin = model.get_submodule(head_name)
        qw = get_solver("rtn").fn(lin.weight.detach(), None, head)
        set_module(model, head_name, QuantLinear.from_quantized(qw, head, lin.bias))
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False  # the embedding table keeps its own float weight
        report[head_name] = {"bits": head.bits, "solver": "rtn"}
    elapsed = time.perf_counter() - t0
    model.qbayes_config = {
        "method": method,
        "options": options,
        "float_dtype": float_dtype,
        "quantize_seconds": elapsed,
        "layers": {n: {**spec_for(n).to_dict(), **report.get(n, {})} for n in selected},
    }
    if head_name is not None:
        model.qbayes_config["layers"][head_name] = {**head.to_dict(), **report[head_name]}
    log.info("quantized %d layers with %s in %.1f s", len(selected), method, elapsed)
    return model


def quantize_activations_(
    model: nn.Module | ModelAdapter,
    spec: ActSpec,
    calib=None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = DEFAULT_EXCLUDE,
    matmuls: ActSpec | None = None,
    softmax: ActSpec | None = None,
    smoothquant: float | str | None = None,
    smoothquant_w_bits: int = 8,
    noisyquant: bool = False,
    noisyquant_seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, ActQuant]:
    """Quantize the inputs of the linear and convolution layers (float or packed) of ``model``.

    Every ``nn.Linear``/``nn.Conv2d`` of the model (not only those in its blocks) that the glob
    filters keep (by default all but embeddings and ``lm_head``) gets an :class:`~qbayes.nn.act_quant.ActQuant` in front of it; static
    ranges are observed on ``calib`` (batches in the model adapter's language) and frozen.
    ``matmuls`` also quantizes the operands of the attention matmuls (the model adapter's
    ``nn.Identity`` points ``q_point``/``k_point``/``v_point``: qbayes's ViT defines them, Hugging
    Face BERT/ViT/Llama-style models get them through :mod:`qbayes.models.hf_attention`), and
    ``softmax`` the attention probabilities (``probs_point``; e.g. ``ActSpec(4, format="logsqrt2")``;
    defaults to ``matmuls``). ``smoothquant`` (an ``α`` in [0, 1], or ``"search"`` for a per-layer search
    against ``smoothquant_w_bits``-bit weights) first rescales every float ``nn.Linear``'s input
    channels (:mod:`qbayes.transforms.smoothquant`; call it before ``quantize_``). ``noisyquant``
    then gives each layer input quantizer NoisyQuant's fixed noisy bias, its amplitude searched per
    layer on the calibration data (:mod:`qbayes.transforms.noisyquant`; static integer ranges only;
    the draw is reproducible from ``noisyquant_seed``). Returns ``{point name: quantizer}``; the
    model keeps them as submodules.
    """
    if not isinstance(spec, ActSpec):
        raise QBayesError(f"spec must be an ActSpec, not {type(spec).__name__}")
    adapter = adapter_for(model)
    model = adapter.model
    kinds = (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)
    if include:
        check_selection(model, include, kinds)
    keep = name_filter(include, exclude)
    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, kinds) and keep(n)}
    inner = {n + ".packed" for n, m in layers.items() if isinstance(m, QuantConv2d)}
    names = [n for n in layers if n not in inner]
    if not names:
        raise QBayesError("no Linear/Conv2d layers match the include/exclude filters")
    if noisyquant and (spec.dynamic or spec.format != "int"):
        raise QBayesError("noisyquant: NoisyQuant's noise is measured in the step of a static integer range; "
                          f"this spec is {'dynamic' if spec.dynamic else spec.format}")

    def run_calibration(what: str):
        def run():
            with torch.no_grad():
                for b in tqdm(adapter.batches(calib, batch_size, _device_of(model)), desc=what, unit="batch",
                              disable=not progress):
                    adapter.forward(b)
        return run

    smoothing = {}
    if smoothquant is not None:
        from .transforms.smoothquant import smooth_linears

        _require_calib(calib, "SmoothQuant needs")
        linears = {n: layers[n] for n in names if isinstance(layers[n], (nn.Linear, QuantLinear))}
        smoothing = smooth_linears(linears, run_calibration("smoothquant statistics"), spec, smoothquant,
                                   smoothquant_w_bits)
    points = quantize_inputs(model, names, spec)
    for name, sm in smoothing.items():
        points[name].smooth = sm["inv_scale"].to(_device_of(model))
    softmax = softmax or matmuls
    if matmuls is not None or softmax is not None:
        attention = adapter.attention_points()
        if not attention:
            raise QBayesError(f"matmuls=/softmax=: this {adapter.family} model has no attention matmuls qbayes can "
                              "reach (its own ViT and Hugging Face models whose attention uses transformers' "
                              "attention interface have them)")
        mods = dict(model.named_modules())
        for name in attention:
            point_spec = softmax if name.endswith(SOFTMAX_POINTS) else matmuls
            if point_spec is not None and isinstance(mods[name], nn.Identity):
                points[name] = ActQuant(point_spec)
                set_module(model, name, points[name])
    if any(not q.spec.dynamic for q in points.values()):
        _require_calib(calib, "static activation ranges need")
        batches = adapter.batches(calib, batch_size, _device_of(model))
        with torch.no_grad():
            for b in tqdm(batches, desc="activation ranges", unit="batch", disable=not progress):
                adapter.forward(b)
        for name, q in points.items():
            try:
                q.freeze()
            except CalibrationError as e:
                raise CalibrationError(f"{name}: {e}") from None
    noisy = {}
    if noisyquant:
        from .transforms.noisyquant import add_noisy_bias

        noisy = add_noisy_bias({n: layers[n] for n in names}, run_calibration("noisyquant inputs"),
                               seed=noisyquant_seed)
    model.qbayes_activations = {"spec": spec.to_dict(), "points": sorted(points),
                                "smoothquant": {n: sm["alpha"] for n, sm in smoothing.items()},
                                **({"noisyquant": {n: r["k"] for n, r in noisy.items()}} if noisyquant else {})}
    return points


def _require_calib(calib, what: str) -> None:
    if calib is None:
        raise CalibrationError(f"{what} calibration data: pass calib= (batches the model adapter understands)")


def select_layers(model, spec, include: Iterable[str] | None = None,
                  exclude: Iterable[str] | None = DEFAULT_EXCLUDE, convs: bool = False) -> dict[str, nn.Module]:
    """The linears ``quantize_`` would quantize, after checking that each one can be: raises a
    clear error for a layer that is not a linear, a group size that does not divide, or
    non-finite weights, before anything is changed (:meth:`qbayes.models.ModelAdapter.select`)."""
    return adapter_for(model).select(_spec_function(spec), include, exclude,
                                     kinds=LAYER_KINDS if convs else (nn.Linear,))


def _check_convs(selected: Mapping[str, nn.Module]) -> None:
    for name, m in selected.items():
        if isinstance(m, nn.Conv2d):
            check_conv(m, name)


def _check_head(model, head) -> str:
    """Qualified name of the model's output head, after checking ``head`` can pack it."""
    if not isinstance(head, QuantSpec):
        raise QBayesError(f"head must be a QuantSpec, not {type(head).__name__}")
    adapter = adapter_for(model)
    name = adapter.output_head()
    if name is None:
        raise QBayesError(f"head=: this {adapter.family} model has no nn.Linear output head to pack")
    out = adapter.model.get_submodule(name)
    head.check_layer(out.in_features, name)
    if not torch.isfinite(out.weight).all():
        raise QBayesError(f"{name}.weight holds NaN/Inf values: refusing to quantize a broken model")
    return name


def _spec_function(spec) -> Callable[[str], QuantSpec]:
    if isinstance(spec, QuantSpec):
        return lambda name: spec
    if isinstance(spec, Mapping):
        def from_map(name: str) -> QuantSpec:
            if name not in spec:
                raise QBayesError(f"no QuantSpec given for layer {name}")
            return spec[name]
        return from_map
    if callable(spec):
        return spec
    raise QBayesError(f"spec must be a QuantSpec, a mapping or a function, not {type(spec).__name__}")


def _representable_scales(spec_for: Callable[[str], QuantSpec], selected: Mapping[str, nn.Module]
                          ) -> Callable[[str], QuantSpec]:
    """``spec_for`` with float32 scales for the layers where a 16-bit scale dtype cannot hold the
    min-max scale of some group (below its smallest normal: a group spanning less than ~1e-3 at 4
    bits in float16; or above its max), so that no group is silently flushed to zero or clipped."""
    promoted: dict[str, QuantSpec] = {}
    for name, lin in selected.items():
        s = spec_for(name)
        if s.scale_dtype == "float32":
            continue
        fin = torch.finfo(s.torch_scale_dtype)
        w = group_view(lin.weight.detach().float().reshape(lin.weight.shape[0], -1), s.group_size)
        span = 2 * w.abs().amax(-1) if s.symmetric else w.amax(-1) - w.amin(-1)
        span = span[span > 0]
        if not span.numel():
            continue
        levels = 2 ** s.bits - 1
        if float(span.min()) / levels < fin.tiny or float(span.max()) / levels > fin.max:
            promoted[name] = dataclasses.replace(s, scale_dtype="float32")
            log.warning("%s: some group scales are outside the range of %s scales; this layer stores float32 scales",
                        name, s.scale_dtype)
    return (lambda name: promoted.get(name) or spec_for(name)) if promoted else spec_for


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's tensors are (a fully packed model has buffers but no parameters)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _round_float_params(model: nn.Module, quantized: set[str], dtype: torch.dtype) -> None:
    """Round every float parameter/buffer that stays in float to ``dtype`` precision, in place."""
    if dtype == torch.float32:
        return
    finfo = torch.finfo(dtype)
    skip = {n + ".weight" for n in quantized}
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():  # what a checkpoint stores
            if name in skip or not t.is_floating_point() or t.dtype == dtype:
                continue
            if t.numel() and t.abs().max() > finfo.max:
                log.warning("%s exceeds the range of %s; it stays in %s", name, dtype, t.dtype)
                continue
            t.copy_(t.to(dtype).to(t.dtype))
