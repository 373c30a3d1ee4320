r"""Sample-quality metrics on feature arrays, and paired image metrics.

Distribution metrics take two sets of feature vectors ``(n, d)`` (numpy or torch; computed in
float64). Which network made the features is the caller's choice: these are the formulas of the
papers, not tied to Inception (:mod:`qbayes.diffusion.metrics` feeds them a Fashion-MNIST
classifier's features).

* Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule"), of the
  Gaussians fitted to the two sets:

  .. math:: d^2 = ‖μ_a − μ_b‖^2 + \operatorname{tr}\bigl(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}\bigr),

  the square roots taken by symmetric eigen-decompositions (eigenvalues clipped at 0), so no
  complex part appears and a singular ``Σ`` (fewer samples than dimensions) is fine.
* KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared
  MMD with the cubic kernel :math:`k(x, y) = (x^T y / d + 1)^3`, over ``subsets`` random subsets
  of ``subset_size`` rows of each set (without replacement within a subset):

  .. math:: \widehat{MMD}^2 = \frac{1}{m(m−1)}\sum_{i≠j} [k(a_i,a_j) + k(b_i,b_j)] − \frac{2}{m^2}\sum_{i,j} k(a_i,b_j);

  mean and standard deviation over the subsets. Unbiased: zero in expectation (it can be
  negative) when both sets come from one distribution.
* Precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric for
  assessing generative models"): each set's manifold is the union of balls around its points of
  radius the distance to the point's ``k``-th nearest neighbour in its own set; precision is
  the fraction of fake points inside the real manifold, recall the fraction of real points
  inside the fake one.

Paired image metrics take ``(B, C, H, W)`` batches and return one value per image (float64):

* PSNR ``10 log10(R² / MSE)`` for the data range ``R`` (``inf`` for identical images);
* SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment: from error visibility
  to structural similarity"), the mean over the valid positions of every channel of

  .. math:: \frac{(2μ_xμ_y + C_1)(2σ_{xy} + C_2)}{(μ_x^2 + μ_y^2 + C_1)(σ_x^2 + σ_y^2 + C_2)},
            \quad C_1 = (K_1 R)^2,\ C_2 = (K_2 R)^2,

  local moments under an 11×11 Gaussian window (σ = 1.5, normalised, no padding), K1 = 0.01,
  K2 = 0.03: scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=R)``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import QBayesError

_CHUNK = 1024  # rows per block of a pairwise-distance computation


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (module docstring);
    covariances with ``n − 1`` in the denominator."""
    a, b = _pair(feats_a, feats_b, "frechet_distance", min_rows=2)
    return frechet_distance_from_moments(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_distance_from_moments(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """The same distance from the means ``(d,)`` and covariances ``(d, d)`` themselves."""
    mu_a, mu_b = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu_a, mu_b))
    sa, sb = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma_a, sigma_b))
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,) or sa.shape != (d, d) or sb.shape != (d, d):
        raise QBayesError(f"frechet_distance needs means (d,) and covariances (d, d) of one d, got "
                          f"{mu_a.shape}, {sa.shape}, {mu_b.shape}, {sb.shape}")
    for what, v in (("mean", mu_a), ("mean", mu_b), ("covariance", sa), ("covariance", sb)):
        if not np.isfinite(v).all():
            raise QBayesError(f"frechet_distance: a {what} holds NaN/Inf values")
    root_a = _psd_sqrt(sa)
    inner = np.linalg.eigvalsh(_sym(root_a @ sb @ root_a))
    tr_cross = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    dist = float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2.0 * tr_cross)
    return max(dist, 0.0)  # ≥ 0 exactly; a tiny negative is rounding


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """``(mean, std)`` of the unbiased squared MMD with the cubic polynomial kernel over
    ``subsets`` subsets of ``min(subset_size, n_a, n_b)`` rows of each set, drawn by a numpy
    generator seeded with ``seed`` (module docstring). ``std`` is 0 for one subset."""
    a, b = _pair(feats_a, feats_b, "kid", min_rows=2)
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise QBayesError(f"kid: subsets must be a positive int, got {subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise QBayesError(f"kid: subset_size must be an int >= 2, got {subset_size!r}")
    m, d = min(subset_size, len(a), len(b)), a.shape[1]
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for s in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        vals[s] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                   - 2.0 * kxy.mean())
    return float(vals.mean()), float(vals.std(ddof=1)) if subsets > 1 else 0.0


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake`` against ``real`` with ``k``-NN manifolds (module
    docstring); a point on a ball's boundary counts as inside. Needs more than ``k`` rows each."""
    r, f = _pair(real, fake, "precision_recall", min_rows=2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise QBayesError(f"precision_recall: k must be a positive int, got {k!r}")
    if min(len(r), len(f)) <= k:
        raise QBayesError(f"precision_recall with k={k} needs more than {k} real and fake rows, "
                          f"got {len(r)} and {len(f)}")
    r, f = torch.from_numpy(r), torch.from_numpy(f)
    r_rad, f_rad = _knn_radii2(r, k), _knn_radii2(f, k)
    return _coverage(f, r, r_rad), _coverage(r, f, f_rad)


def psnr(x, ref, data_range: float) -> torch.Tensor:
    """Per-image PSNR ``10 log10(data_range² / MSE)`` ``(B,)`` float64 of ``x`` against ``ref``
    ``(B, ...)`` (``inf`` where they are equal)."""
    x, ref = _images(x, ref, "psnr", min_dims=2)
    mse = (x - ref).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(_range(data_range) ** 2 / mse)


def ssim(x, ref, data_range: float, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM ``(B,)`` float64 of ``x`` against ``ref`` ``(B, C, H, W)`` (module
    docstring): the mean of the SSIM map over its valid ``(H − 10) × (W − 10)`` positions and
    the channels. Images must be at least ``win_size`` pixels each way."""
    x, ref = _images(x, ref, "ssim", min_dims=4)
    if x.dim() != 4:
        raise QBayesError(f"ssim takes (B, C, H, W) batches, got shape {tuple(x.shape)}")
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise QBayesError(f"ssim: win_size must be an odd positive int, got {win_size!r}")
    if min(x.shape[-2:]) < win_size:
        raise QBayesError(f"ssim with an {win_size}×{win_size} window needs images at least that large, "
                          f"got {tuple(x.shape[-2:])}")
    R = _range(data_range)
    c1, c2 = (k1 * R) ** 2, (k2 * R) ** 2
    u = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    w = torch.exp(-u ** 2 / (2 * sigma ** 2))
    w = w / w.sum()
    b, c, h, wd = x.shape

    def blur(z):  # separable "valid" Gaussian filter of every channel
        z = z.reshape(b * c, 1, h, wd)
        z = torch.nn.functional.conv2d(z, w.view(1, 1, 1, -1))
        return torch.nn.functional.conv2d(z, w.view(1, 1, -1, 1))

    mx, my = blur(x), blur(ref)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(ref * ref) - my * my, blur(x * ref) - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.reshape(b, -1).mean(1)


# ---------------------------------------------------------------------------------- helpers
def _feats(v, what: str, fn: str) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double().numpy()
    try:
        v = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise QBayesError(f"{fn}: {what} is not a numeric array ({e})") from None
    if v.ndim != 2 or not v.size:
        raise QBayesError(f"{fn}: {what} must be a non-empty feature array (n, d), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise QBayesError(f"{fn}: {what} holds NaN/Inf features")
    return v


def _pair(a, b, fn: str, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = _feats(a, "the first set", fn), _feats(b, "the second set", fn)
    if a.shape[1] != b.shape[1]:
        raise QBayesError(f"{fn}: the feature sets have different dimensions, {a.shape[1]} and {b.shape[1]}")
    if min(len(a), len(b)) < min_rows:
        raise QBayesError(f"{fn} needs at least {min_rows} rows per set, got {len(a)} and {len(b)}")
    return a, b


def _sym(m: np.ndarray) -> np.ndarray:
    return 0.5 * (m + m.T)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root (negative rounding eigenvalues clipped to 0)."""
    lam, u = np.linalg.eigh(_sym(m))
    return _sym((u * np.sqrt(np.clip(lam, 0.0, None))) @ u.T)


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * a @ b.T).clamp_(min=0.0)


def _knn_radii2(x: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance of every row to its ``k``-th nearest other row (itself, at 0, excluded)."""
    out = torch.empty(len(x), dtype=x.dtype)
    for i in range(0, len(x), _CHUNK):
        d = _sqdist(x[i:i + _CHUNK], x)
        d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = 0.0  # exact self-distance
        out[i:i + _CHUNK] = d.kthvalue(k + 1, dim=1).values
    return out


def _coverage(query: torch.Tensor, centres: torch.Tensor, radii2: torch.Tensor) -> float:
    """Fraction of ``query`` rows within some ball ``‖q − c_j‖² ≤ r_j²``."""
    inside = 0
    for i in range(0, len(query), _CHUNK):
        inside += int((_sqdist(query[i:i + _CHUNK], centres) <= radii2).any(1).sum())
    return inside / len(query)


def _range(data_range) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not math.isfinite(data_range) \
            or data_range <= 0:
        raise QBayesError(f"data_range must be a positive number (e.g. 1.0 for [0, 1], 2.0 for [-1, 1]), "
                          f"got {data_range!r}")
    return float(data_range)


def _images(x, ref, fn: str, min_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, ref = (torch.as_tensor(v).detach().cpu().double() for v in (x, ref))
    if x.shape != ref.shape:
        raise QBayesError(f"{fn}: the images and the reference differ in shape, {tuple(x.shape)} and "
                          f"{tuple(ref.shape)}")
    if x.dim() < min_dims or x.shape[0] < 1 or not x.numel():
        raise QBayesError(f"{fn} takes a non-empty batch (B, ...) of at least {min_dims} dims, got {tuple(x.shape)}")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(ref).all())):
        raise QBayesError(f"{fn}: the images hold NaN/Inf values")
    return x, ref
