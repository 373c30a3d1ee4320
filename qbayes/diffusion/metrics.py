r"""Sample-quality and paired metrics for the Fashion-MNIST DDPM (:mod:`qbayes.diffusion.zoo`).

**Feature space.** FID, KID and precision/recall are computed in the feature space of a
*Fashion-MNIST classifier*, not Inception-v3: the 128-d pooled penultimate activations of the
MobileNetV2-style net ``fmnist-mobilenet`` that qbayes ships (:func:`qbayes.models.vision.
fmnist_mobilenet`, trained by ``bench/models/train_fmnist.py``, 92.1 % test top-1). The numbers
are therefore comparable with each other (float vs quantized, sampler vs sampler), never with
published Inception FIDs. The formulas are those of :mod:`qbayes.eval.image_metrics`.

The classifier was trained on 28×28 images ``x/255`` in [0, 1]; DDPM images are in [-1, 1],
32×32 (padded by 2). :func:`classifier_features` crops the centre 28×28, maps ``(x + 1)/2`` and
clips to [0, 1] (the range an image file would hold) before the classifier sees them.

**Paired metrics** (:func:`paired_metrics`): with the same ``x_T`` and deterministic DDIM
(``η = 0``), the float model's trajectory ``x_t`` is run once; at every step the quantized model
is evaluated on the *same* input, giving the per-step noise-prediction error
``E‖ε_q(x_t, t) − ε_f(x_t, t)‖² / D``; then the quantized model samples its own trajectory from
the same ``x_T``, and the two final samples (clipped to [-1, 1]) are compared by PSNR (data range 2).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..data import load_image_dataset
from ..errors import QBayesError
from ..eval.image_metrics import frechet_distance, kid, precision_recall, psnr
from .schedule import EpsModel, Schedule

#: samples per set the image-quality protocol asks for
PROTOCOL_MIN_SAMPLES = 5000
FEATURE_MODEL = "fmnist-mobilenet"
FEATURE_SPACE = ("fmnist-mobilenet pooled penultimate features (128-d) of a Fashion-MNIST classifier; "
                 "not Inception: do not compare with published FIDs")


@functools.lru_cache(maxsize=1)
def _feature_net() -> nn.Module:
    from ..models.vision import load_vision

    net = load_vision(FEATURE_MODEL)
    return nn.Sequential(*list(net)[:-1]).eval()  # everything up to the pooled, flattened features


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """DDPM images in [-1, 1], ``(N, 1, 32, 32)`` (centre-cropped) or ``(N, 1, 28, 28)``, as the
    classifier's training inputs: ``(N, 1, 28, 28)`` float32 in [0, 1]."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise QBayesError(f"images must be a floating-point tensor in [-1, 1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) not in ((32, 32), (28, 28)) \
            or images.shape[0] < 1:
        raise QBayesError(f"images must be Fashion-MNIST DDPM images (N, 1, 32, 32) or (N, 1, 28, 28), "
                          f"got shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise QBayesError("images hold NaN/Inf values (a diverged sampler?)")
    if images.shape[-1] == 32:
        images = images[..., 2:30, 2:30]
    return ((images.detach().float().cpu() + 1) / 2).clamp_(0, 1)


@torch.no_grad()
def classifier_features(images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``(N, 128)`` float32 Fashion-MNIST-classifier features (module docstring) of DDPM images
    in [-1, 1] (see :func:`to_classifier_input`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QBayesError(f"batch_size must be a positive int, got {batch_size!r}")
    x, net = to_classifier_input(images), _feature_net()
    return torch.cat([net(b) for b in x.split(batch_size)])


def fmnist_images(split: str = "test", n: int | None = None) -> torch.Tensor:
    """Real Fashion-MNIST images in the DDPM's convention: ``(n, 1, 32, 32)`` in [-1, 1], padded
    with the background (-1); the first ``n`` of ``split`` (all if ``None``)."""
    x, _ = load_image_dataset("fashion-mnist", split, normalize=None)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(x):
            raise QBayesError(f"n must be an int in 1..{len(x)}, got {n!r}")
        x = x[:n]
    return nn.functional.pad(x * 2 - 1, (2, 2, 2, 2), value=-1.0)


def image_quality(samples: torch.Tensor, reference: torch.Tensor, *, min_samples: int = PROTOCOL_MIN_SAMPLES,
                  k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                  batch_size: int = 500) -> dict:
    """FID, KID (mean, std), precision and recall of ``samples`` against ``reference`` (the
    real images) in the Fashion-MNIST-classifier feature space.

    ``samples`` and ``reference``: DDPM images ``(N, 1, 32|28, 32|28)`` in [-1, 1], or features
    ``(N, 128)`` already made by :func:`classifier_features` (to reuse a reference set's).
    Fewer than ``min_samples`` rows in either set is an error; the protocol asks for
    ``PROTOCOL_MIN_SAMPLES`` (5,000), so a smaller ``min_samples`` is allowed (for tests) and the
    result then carries a ``warning``. ``k``: the precision/recall neighbourhood; KID uses
    ``kid_subsets`` subsets of ``kid_subset_size`` rows, seeded by ``seed``.

    Returns ``{"fid", "kid", "kid_std", "precision", "recall", "n", "n_reference",
    "feature_space", "warning"}`` (``warning`` ``None`` at protocol size).
    """
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < k + 1:
        raise QBayesError(f"min_samples must be an int > k={k}, got {min_samples!r}")
    fs, fr = _features(samples, "samples", batch_size), _features(reference, "reference", batch_size)
    n, n_ref = fs.shape[0], fr.shape[0]
    if min(n, n_ref) < min_samples:
        raise QBayesError(f"image_quality needs at least min_samples={min_samples} samples and reference images, "
                          f"got {n} and {n_ref} (the protocol asks for {PROTOCOL_MIN_SAMPLES}; FID is biased "
                          "upward at small n)")
    fid = frechet_distance(fr, fs)
    kid_mean, kid_std = kid(fr, fs, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    precision, recall = precision_recall(fr, fs, k=k)
    warning = None
    if min(n, n_ref) < PROTOCOL_MIN_SAMPLES:
        warning = (f"{min(n, n_ref)} < {PROTOCOL_MIN_SAMPLES} rows: below the protocol's sample size; FID is biased "
                   "upward and these numbers are not comparable with protocol-size ones")
    return {"fid": fid, "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall, "n": n,
            "n_reference": n_ref, "feature_space": FEATURE_SPACE, "warning": warning}


def paired_metrics(eps_float: EpsModel, eps_quant: EpsModel, schedule: Schedule, x_T: torch.Tensor,
                   steps: int = 50, batch_size: int | None = None, data_range: float = 2.0,
                   clip: tuple[float, float] | None = (-1.0, 1.0), progress: bool = False) -> dict:
    """Float vs quantized denoiser along the same deterministic DDIM trajectory (module docstring).

    ``eps_float``, ``eps_quant``: ``eps(x_t, t) -> ε̂`` (a ``diffusers`` UNet is wrapped by
    :func:`~qbayes.diffusion.sampling.eps_model_of`); ``x_T`` ``(B, ...)`` the shared start noise,
    run in chunks of ``batch_size`` rows (all at once if ``None``). Final samples are clipped to
    ``clip`` (``None``: not clipped) before the PSNR with ``data_range``.

    Returns ``{"timesteps": [t per step], "eps_mse": [per-step mean ε-MSE], "eps_mse_mean",
    "psnr" (mean of the per-image PSNRs; inf if any pair is equal), "psnr_min", "psnr_pooled" (from the
    pooled MSE), "sample_mse", "n", "steps", "x_float", "x_quant" (the two final sample sets)}``.
    """
    from .sampling import ddim_sample, eps_model_of

    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.dim() < 2 or not x_T.shape[0]:
        raise QBayesError(f"x_T must be a floating-point noise batch (B, ...), got "
                          f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
    size = x_T.shape[0] if batch_size is None else batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise QBayesError(f"batch_size must be a positive int or None, got {batch_size!r}")
    ef, eq = (eps_model_of(m) if isinstance(m, nn.Module) else m for m in (eps_float, eps_quant))
    timesteps = schedule.timesteps(steps).tolist()
    sq_err = torch.zeros(len(timesteps), dtype=torch.float64)
    outs_f, outs_q = [], []

    def on_step(step, t, x_t, eps):
        e_q = eq(x_t, torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device))
        if not isinstance(e_q, torch.Tensor) or e_q.shape != eps.shape:
            raise QBayesError(f"eps_quant returned {getattr(e_q, 'shape', type(e_q).__name__)} for x_t of shape "
                              f"{tuple(x_t.shape)}; it must predict the noise, shaped like x_t")
        err = (e_q.to(eps.dtype) - eps).double().pow(2)
        if not bool(torch.isfinite(err).all()):
            raise QBayesError(f"eps_quant's noise prediction holds NaN/Inf at step {step} (t={int(t)})")
        sq_err[step] += err.flatten(1).mean(1).sum().cpu()

    with torch.no_grad():
        for chunk in x_T.split(size):
            outs_f.append(ddim_sample(ef, schedule, chunk, steps, hooks=(on_step,), progress=progress).cpu())
            outs_q.append(ddim_sample(eq, schedule, chunk, steps, progress=progress).cpu())
    xf, xq = torch.cat(outs_f), torch.cat(outs_q)
    if clip is not None:
        xf, xq = xf.clamp(*clip), xq.clamp(*clip)
    if not bool(torch.isfinite(xq).all()):
        raise QBayesError("the quantized model's samples hold NaN/Inf values")
    per_image = psnr(xq, xf, data_range)
    mse = float((xq.double() - xf.double()).pow(2).mean())
    eps_mse = (sq_err / x_T.shape[0]).tolist()
    return {"timesteps": timesteps, "eps_mse": eps_mse, "eps_mse_mean": sum(eps_mse) / len(eps_mse),
            "psnr": float(per_image.mean()), "psnr_min": float(per_image.min()),
            "psnr_pooled": 10 * math.log10(data_range ** 2 / mse) if mse > 0 else math.inf,
            "sample_mse": mse, "n": x_T.shape[0], "steps": steps, "x_float": xf, "x_quant": xq}


def _features(v: torch.Tensor, what: str, batch_size: int) -> torch.Tensor:
    """Features of ``v``: images (4-D) go through the classifier, 2-D arrays are taken as features."""
    if isinstance(v, torch.Tensor) and v.dim() == 4:
        return classifier_features(v, batch_size)
    if isinstance(v, torch.Tensor) and v.dim() == 2:
        if not bool(torch.isfinite(v).all()):
            raise QBayesError(f"the {what} features hold NaN/Inf values")
        return v
    raise QBayesError(f"{what} must be DDPM images (N, 1, H, W) or classifier features (N, D) as a tensor, got "
                      f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
