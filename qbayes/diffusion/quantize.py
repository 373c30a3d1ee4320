r"""Post-training quantization of diffusion UNets, each method of the literature a named option:
:func:`quantize_unet_` (weights ``w_bits``, activations ``a_bits``, one front door).

Common to all methods: every ``nn.Conv2d``/``nn.Linear`` of the UNet but the time-embedding MLP
(``*embed*``, left in float as :mod:`qbayes.models.unet` does by default) gets per-output-channel
integer weights solved by GPTQ (:func:`qbayes.quantize_`, MSE clipping) and a static per-tensor
integer quantizer on its input (observer ``observer``, default MSE); ``conv_in``/``conv_out``
(the image-facing layers) stay at 8 bits for weights and activations, as is common practice.
Calibration data are the denoiser's inputs ``(x_t, t)`` along seeded deterministic DDIM
trajectories of the float model with the sampling grid of ``steps`` steps
(:func:`~qbayes.diffusion.sampling.calibration_batches`).

* ``"naive"``: all statistics (GPTQ's ``H``, every activation range) from one timestep of the
  grid, ``naive_t`` (default: its middle step), ``calib_rows`` images there; one static range
  then serves every timestep.
* ``"qdiffusion"`` (Li et al. 2023, Q-Diffusion; also PTQ4DM's across-timestep sampling): the
  same number of rows drawn uniformly across the grid (``per_step`` per step), plus *split
  quantization* of concatenated skip inputs: the 1×1 shortcut of every up-path residual block
  sees ``cat(h, skip)``, deep features next to shallow ones with very different ranges, and gets
  one range per part (:class:`SplitActQuant`; the split found by :func:`concat_splits`).
* ``"tfmq"`` (Huang et al. 2024, TFMQ-DM): Q-Diffusion, and the *temporal* layers (every residual
  block's ``time_emb_proj``, whose input depends on ``t`` alone: one vector per sampling timestep)
  calibrated on that finite set: min-max ranges over it (finite set calibration: every timestep's
  features are represented, none clipped) and GPTQ's ``H`` with every timestep weighted equally
  (calibration has the same rows per step), the layer-wise form of its temporal reconstruction.
* ``"tdq"`` (So et al. 2023): Q-Diffusion's data, and every activation range a function of the
  timestep produced by a small network (:class:`~qbayes.diffusion.tdq.TimestepActQuant`).

``lowrank`` (any method): SVDQuant's float low-rank branch (Li et al. 2024) on every quantized
layer, the residual left for GPTQ (:func:`qbayes.transforms.split_lowrank_`; an int rank or a
fraction of each layer's smaller dimension).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..api import quantize_
from ..errors import QBayesError
from ..models.unet import UNetAdapter
from ..nn import QuantConv2d, QuantLinear
from ..nn.act_quant import ActQuant, attach_input_quant
from ..spec import ActSpec, QuantSpec
from .sampling import calibration_batches, eps_model_of, naive_calibration_batches
from .schedule import Schedule
from .tdq import TimestepActQuant, TimestepClock

METHODS = ("naive", "qdiffusion", "tfmq", "tdq")
IMAGE_LAYERS = ("conv_in", "conv_out")


class SplitActQuant(nn.Module):
    """Quantizes channels ``[:split]`` and ``[split:]`` (dimension 1) of its input with separate
    quantizers ``first`` and ``second`` (any activation quantizer modules)."""

    def __init__(self, first: nn.Module, second: nn.Module, split: int):
        super().__init__()
        self.first, self.second, self.split = first, second, int(split)

    @property
    def calibrated(self) -> bool:
        return self.first.calibrated and self.second.calibrated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not 0 < self.split < x.shape[1]:
            raise QBayesError(f"split at channel {self.split} of an input with {x.shape[1]} channels")
        return torch.cat([self.first(x[:, :self.split]), self.second(x[:, self.split:])], 1)

    def freeze(self) -> None:
        self.first.freeze()
        self.second.freeze()

    def extra_repr(self) -> str:
        return f"split={self.split}"


def concat_splits(unet: nn.Module, batch) -> dict[str, int]:
    """``{layer name: channels of h}`` for the layers whose input is the skip concatenation
    ``cat(h, skip)`` of a ``diffusers`` up block: each up-path residual block's ``conv_shortcut``.
    Found by one forward of ``batch`` ``(x_t, t)`` with the up blocks' skip tensors recorded."""
    seen, handles = {}, []
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        def hook(module, args, kwargs, i=i):
            skips = args[1] if len(args) > 1 else kwargs.get("res_hidden_states_tuple")
            if skips is not None:
                seen[i] = [s.shape[1] for s in skips]
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            unet(batch[0][:1], batch[1][:1])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, skips in seen.items():
        for j, resnet in enumerate(unet.up_blocks[i].resnets):
            sc = getattr(resnet, "conv_shortcut", None)
            if sc is not None and j < len(skips):
                out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = resnet.in_channels - skips[-1 - j]
    return out


def quantize_unet_(unet: nn.Module, schedule: Schedule, w_bits: int = 8, a_bits: int = 8, method: str = "qdiffusion",
                   *, steps: int = 50, calib_rows: int = 800, per_step: int | None = None, naive_t: int | None = None,
                   observer: str = "mse", lowrank: int | float | None = None, seed: int = 0, batch_size: int = 64,
                   progress: bool = True) -> dict:
    """Quantize a ``diffusers`` ``UNet2DModel`` in place (module docstring); returns a report that
    the model also keeps as ``unet.qbayes_diffusion``. ``calib_rows`` calibration images in all
    (``per_step = calib_rows // steps`` per step unless given); ``seed`` seeds the trajectories."""
    if method not in METHODS:
        raise QBayesError(f"unknown diffusion quantization method {method!r}: choose one of {METHODS}")
    if not UNetAdapter.matches(unet):
        raise QBayesError(f"quantize_unet_ takes a diffusers UNet2DModel, not {type(unet).__name__}")
    if any(isinstance(m, (QuantLinear, QuantConv2d)) or hasattr(m, "input_quant") for m in unet.modules()):
        raise QBayesError("this UNet is already quantized: start from the float model")
    for b, what in ((w_bits, "w_bits"), (a_bits, "a_bits")):
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise QBayesError(f"{what} must be an int from 2 to 8, got {b!r}")
    t0 = time.perf_counter()
    cfg = unet.config
    shape = (cfg["in_channels"], *((cfg["sample_size"],) * 2 if isinstance(cfg["sample_size"], int)
                                    else tuple(cfg["sample_size"])))
    eps = eps_model_of(unet)
    if method == "naive":
        t_one = naive_t if naive_t is not None else int(schedule.timesteps(steps)[steps // 2])
        calib = naive_calibration_batches(eps, schedule, calib_rows, shape, t=t_one, steps=steps, seed=seed,
                                          batch_size=batch_size, progress=progress)
    else:
        per = per_step or max(1, calib_rows // steps)
        trajectories = max(4 * per, 32)  # each step keeps `per` of them, a different draw per step
        calib = calibration_batches(eps, schedule, trajectories, shape, steps, per_step=per, seed=seed,
                                    batch_size=batch_size, progress=progress)
    rows = sum(b[0].shape[0] for b in calib)
    splits = concat_splits(unet, calib[0]) if method != "naive" else {}
    adapter = UNetAdapter(unet)
    selected = adapter.select(lambda n: QuantSpec(group_size=-1), None, ("*embed*",), kinds=(nn.Linear, nn.Conv2d))
    names = list(selected)
    temporal = set(adapter.time_embedding_layers()) & set(names)

    lr_report = {}
    if lowrank is not None:
        from ..transforms.lowrank import split_lowrank_
        lr_report = split_lowrank_({n: selected[n] for n in names if n not in IMAGE_LAYERS}, lowrank)

    def wspec(name):
        return QuantSpec(bits=8 if name in IMAGE_LAYERS else w_bits, group_size=-1, clip="mse")
    quantize_(unet, wspec, "gptq", calib, include=names, exclude=(), batch_size=batch_size, progress=progress,
              convs=True, float_dtype="float32")

    def aspec(name, obs=observer):
        return ActSpec(bits=8 if name in IMAGE_LAYERS else a_bits, observer=obs)
    clock = TimestepClock().attach(unet) if method == "tdq" else None

    def make(name, axis):
        if method == "tdq":
            return TimestepActQuant(aspec(name), clock, T=schedule.T, seed=seed)
        return ActQuant(aspec(name, "minmax" if method == "tfmq" and name in temporal else observer), axis)
    mods = dict(unet.named_modules())
    points = {}
    for name in names:
        layer, axis = mods[name], 1 if isinstance(mods[name], QuantConv2d) else -1
        q = make(name, axis)
        if name in splits:
            q = SplitActQuant(q, make(name, axis), splits[name])
        points[name] = attach_input_quant(layer, q)
    with torch.no_grad():
        for b in adapter.batches(calib, batch_size, next(unet.parameters()).device):
            adapter.forward(b)
    for q in points.values():
        q.freeze()
    report = {"method": method, "w_bits": w_bits, "a_bits": a_bits, "steps": steps, "calib_rows": rows,
              "observer": observer, "splits": splits, "temporal_layers": sorted(temporal),
              "image_layers_8bit": list(IMAGE_LAYERS), "lowrank": lr_report,
              "naive_t": t_one if method == "naive" else None, "seconds": round(time.perf_counter() - t0, 2)}
    unet.qbayes_diffusion = report
    return report
