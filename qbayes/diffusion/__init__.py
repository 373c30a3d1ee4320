"""Diffusion models: the forward process, samplers with hooks, posterior samplers for inverse
problems, and timestep-aware quantization (issue 15; grows file by file)."""
from .schedule import EpsModel, Schedule
from .sampling import (Hook, TimestepRecorder, UNetEps, calibration_batches, ddim_invert, ddim_sample,
                       ddim_step, ddpm_sample, ddpm_step, eps_model_of, naive_calibration_batches, schedule_of)

__all__ = ["EpsModel", "Schedule",
           "Hook", "TimestepRecorder", "UNetEps", "calibration_batches", "ddim_invert", "ddim_sample",
           "ddim_step", "ddpm_sample", "ddpm_step", "eps_model_of", "naive_calibration_batches", "schedule_of"]
from .gmm import GaussianMixture, random_mixture
from .operators import Blur, Downsample, Linear, LinearOperator, Mask, Operator, Sign, box_mask, random_mask
from .posterior import SMCResult, dps, pigdm, reddiff, smc

__all__ += ["GaussianMixture", "random_mixture", "Blur", "Downsample", "Linear", "LinearOperator", "Mask", "Operator",
            "Sign", "box_mask", "random_mask", "SMCResult", "dps", "pigdm", "reddiff", "smc"]
