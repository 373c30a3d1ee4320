"""The Fashion-MNIST DDPM that qbayes trains and ships (``bench/models/train_ddpm.py``).

A small ``diffusers`` ``UNet2DModel`` (ε-prediction, 1 channel, 32×32: the 28×28 images padded
by 2 with the background value, scaled to [-1, 1]) trained under Ho et al.'s linear schedule,
``T = 1000`` (:meth:`Schedule.linear`). Its EMA weights are ``qbayes/models/weights/
fmnist-ddpm.safetensors``, whose metadata carries the UNet config as JSON; the architecture
below is the one the training script builds, so a file that does not fit it is refused.

``diffusers`` is needed only to load it (imported on first use).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, QBayesError
from ..models.vision import WEIGHTS, load_checked
from .schedule import Schedule

FMNIST_DDPM = "fmnist-ddpm"
FMNIST_DDPM_WEIGHTS = WEIGHTS / f"{FMNIST_DDPM}.safetensors"
TRAIN_COMMAND = "python bench/models/train_ddpm.py"

#: the ``UNet2DModel`` keyword arguments of the shipped DDPM (chosen for CPU cost; see the script)
FMNIST_DDPM_CONFIG = {
    "sample_size": 32, "in_channels": 1, "out_channels": 1,
    "block_out_channels": [8, 16, 32], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8, "attention_head_dim": 8, "add_attention": True,  # one attention block, mid (8×8)
}
#: the forward process it was trained under
FMNIST_DDPM_SCHEDULE = {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}


def build_unet(config: dict | None = None):
    """A freshly initialised ``UNet2DModel`` of ``config`` (default :data:`FMNIST_DDPM_CONFIG`)."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise QBayesError("the Fashion-MNIST DDPM is a diffusers UNet2DModel: pip install diffusers") from e
    cfg = dict(FMNIST_DDPM_CONFIG if config is None else config)
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        if k in cfg:
            cfg[k] = tuple(cfg[k])
    try:
        return UNet2DModel(**cfg)
    except (TypeError, ValueError) as e:
        raise QBayesError(f"not a UNet2DModel config ({e}): {cfg}") from None


def fmnist_schedule(spec: dict | None = None) -> Schedule:
    s = dict(FMNIST_DDPM_SCHEDULE if spec is None else spec)
    if s.get("kind") != "linear":
        raise CheckpointError(f"the DDPM's schedule {s} is not the linear one this loader knows")
    return Schedule.linear(int(s["T"]), float(s["beta_start"]), float(s["beta_end"]))


def load_fmnist_ddpm(path: str | Path | None = None):
    """``(unet, schedule)``: the shipped Fashion-MNIST DDPM's ``UNet2DModel`` in eval mode (EMA
    weights) and its :class:`Schedule`. Sample with
    ``qbayes.diffusion.ddim_sample(eps_model_of(unet), schedule, torch.randn(n, 1, 32, 32))``;
    samples are in [-1, 1], 32×32 (crop ``[..., 2:30, 2:30]`` for the 28×28 image).

    ``path``: another safetensors file written by ``bench/models/train_ddpm.py`` (its metadata
    gives the config and schedule). A missing or ill-fitting file raises :class:`CheckpointError`.
    """
    path = Path(path) if path is not None else FMNIST_DDPM_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: train the Fashion-MNIST DDPM with `{TRAIN_COMMAND}` "
                              "(about an hour on 2 CPU cores)")
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        config = json.loads(meta["unet_config"]) if "unet_config" in meta else None
        schedule = json.loads(meta["schedule"]) if "schedule" in meta else None
    except (OSError, ValueError, RuntimeError) as e:  # truncated file, bad header, bad JSON
        raise CheckpointError(f"cannot read the DDPM weights {path}: {e}") from None
    if path == FMNIST_DDPM_WEIGHTS and config is not None and config != FMNIST_DDPM_CONFIG:
        raise CheckpointError(f"{path} was trained with another UNet config ({config}) than the shipped one; "
                              f"retrain with `{TRAIN_COMMAND}`")
    unet = load_checked(build_unet(config), state, f"{path} does not fit the UNet config")
    return unet, fmnist_schedule(schedule)
