"""Adapter for ``diffusers``' ``UNet2DModel`` denoisers (the ε-prediction UNets of DDPM/DDIM).

A batch is ``(x_t, t)`` or ``(x_t, t, target_eps)``: noised images ``(B, C, H, W)``, their
int64 timesteps ``(B,)`` (a scalar is broadcast) and, optionally, the noise that made them.
Running the model is ``model(x_t, t).sample``. The likelihood is a unit-variance Gaussian on
the predicted noise (``"regression"``; the observed target is ``target_eps``), which makes the
model's Fisher the output-space second moment of its ε-prediction, what the DDPM loss weighs.

The whole UNet is one block: its skip connections carry the down path's activations into the
up path, so no chain of blocks passes one hidden state along. Its quantizable layers are its
``nn.Conv2d`` and ``nn.Linear`` layers; :meth:`UNetAdapter.time_embedding_layers` names those
on the timestep path (the time-embedding MLP and each residual block's ``time_emb_proj``), which
timestep-aware methods such as TFMQ-DM treat apart. The default ``exclude`` patterns of
:func:`qbayes.quantize_` (``*embed*``) leave the time-embedding MLP in float (not the
projections); pass ``exclude=[]`` to quantize it too.

The family is recognised by class name, so qbayes imports without ``diffusers``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CalibrationError
from ..nn import QuantLinear
from .adapter import ModelAdapter, at_least_f32, batch_rows, register_adapter
from .hf_attention import exposed_points

CLASS_NAMES = ("UNet2DModel",)
#: module-name prefixes (and the per-resblock suffix) of the layers on the timestep path
TIME_PREFIXES = ("time_embedding.", "class_embedding.")
TIME_SUFFIX = ".time_emb_proj"


def _is_unet(model) -> bool:
    if any(c.__name__ in CLASS_NAMES for c in type(model).__mro__):
        return True
    config = getattr(model, "config", None)
    name = config.get("_class_name") if hasattr(config, "get") else getattr(config, "_class_name", None)
    return name in CLASS_NAMES


@register_adapter
class UNetAdapter(ModelAdapter):
    family = "unet2d"
    likelihood = "regression"
    drives = "diffusers UNet2DModel denoisers called as model(x_t, t).sample"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.Module) and _is_unet(model)

    def time_embedding_layers(self) -> list[str]:
        """Qualified names, in module order, of the linears on the timestep path: the
        time-embedding MLP (``time_embedding.linear_1/2``, a class embedding's) and the
        ``time_emb_proj`` of every residual block (float or already packed)."""
        return [n for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))
                and (n.startswith(TIME_PREFIXES) or n.endswith(TIME_SUFFIX))]

    def attention_points(self) -> list[str]:
        return exposed_points(self.model)  # diffusers' attention keeps its matmuls out of reach

    # ---------------------------------------------------------------------- data
    def check_batch(self, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise CalibrationError("a UNet2DModel batch is (x_t, t) or (x_t, t, target_eps): noised images "
                                   f"(B, C, H, W) and their int64 timesteps (B,), not {type(batch).__name__}"
                                   + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        x, t = batch[0], batch[1]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise CalibrationError("x_t must be float images (batch, channels, height, width), got "
                                   + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
        if isinstance(t, int) and not isinstance(t, bool):
            t = torch.tensor(t)
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise CalibrationError(f"t must be integer timesteps, got {getattr(t, 'dtype', type(t).__name__)}")
        t = t.to(device=x.device, dtype=torch.long)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if t.shape != (x.shape[0],):
            raise CalibrationError(f"t must hold one timestep per image, shape ({x.shape[0]},), got {tuple(t.shape)}")
        if t.numel() and int(t.min()) < 0:
            raise CalibrationError(f"timesteps must be >= 0, got {int(t.min())}")
        out = (x, t)
        if len(batch) == 3:
            eps = batch[2]
            if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
                raise CalibrationError(f"target_eps must be shaped like x_t {tuple(x.shape)}, got "
                                       + (str(tuple(eps.shape)) if isinstance(eps, torch.Tensor) else type(eps).__name__))
            out = (x, t, eps)
        return out

    def _parts(self, data, batch_size: int | None) -> list:
        """One batch ``(x_t, t[, target_eps])`` of stacked tensors (split into ``batch_size`` rows),
        or an iterable of such batches (taken as they are)."""
        if isinstance(data, torch.Tensor):
            raise CalibrationError("a bare tensor has no timesteps: a UNet2DModel batch is (x_t, t) or "
                                   "(x_t, t, target_eps) (qbayes.diffusion.calibration_batches makes them)")
        if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
            whole = self.check_batch(data)
            if batch_size is None:
                return [whole]
            n = batch_rows(whole)
            return [tuple(v[i:i + batch_size] for v in whole) for i in range(0, n, batch_size)]
        return list(data)

    def forward(self, batch) -> torch.Tensor:
        """The predicted noise ``model(x_t, t).sample``."""
        return self.block_output(self.model(batch[0], batch[1]))

    def outputs(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = at_least_f32(self.forward(batch))
        f = f.reshape(f.shape[0], -1)
        y = batch[2].reshape(f.shape[0], -1) if len(batch) > 2 else None
        return f, y

    # ------------------------------------------------------------ block by block
    def block_inputs(self, batches) -> list[tuple[tuple, dict]]:
        return [((b[0], b[1]), {}) for b in batches]

    def block_output(self, out) -> torch.Tensor:
        return out.sample if hasattr(out, "sample") else super().block_output(out)
