"""Image metrics (qbayes.eval.image_metrics) against closed forms and independent references,
and the Fashion-MNIST DDPM metric kit (qbayes.diffusion.metrics, qbayes.diffusion.zoo)."""
import json
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbayes.errors import CheckpointError, QBayesError
from qbayes.eval.image_metrics import (frechet_distance, frechet_distance_from_moments, kid, precision_recall, psnr,
                                       ssim)


# ------------------------------------------------------------------------------- Fréchet
def _fid_scipy(mu1, s1, mu2, s2):
    """The textbook route: tr sqrtm(Σ1 Σ2) by scipy (complex rounding discarded)."""
    cross = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross).real)


def test_frechet_of_commuting_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenvectors: Σ1, Σ2 commute
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_from_moments(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10, abs=1e-12)


def test_frechet_of_general_gaussians_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    d = 8
    m1, m2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ours = frechet_distance_from_moments(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_fid_scipy(mu1, s1, mu2, s2), rel=1e-8)
    assert ours == pytest.approx(frechet_distance_from_moments(mu2, s2, mu1, s1), rel=1e-9)  # symmetric


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.floats(-10, 10), st.floats(-10, 10)),
                min_size=1, max_size=6))
def test_frechet_of_diagonal_gaussians_property(rows):
    a, b, m1, m2 = (np.array(c, dtype=np.float64) for c in zip(*rows))
    exact = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    fwd = frechet_distance_from_moments(m1, np.diag(a), m2, np.diag(b))
    back = frechet_distance_from_moments(m2, np.diag(b), m1, np.diag(a))
    assert fwd >= 0 and back >= 0
    tol = 1e-9 * (a.sum() + b.sum() + ((m1 - m2) ** 2).sum()) + 1e-12
    assert abs(fwd - exact) <= tol and abs(fwd - back) <= tol


def test_frechet_from_samples():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 5))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(torch.from_numpy(x), x) == pytest.approx(0.0, abs=1e-9)  # torch or numpy
    # fewer rows than dimensions: singular covariances are fine, no complex leftovers
    few = rng.standard_normal((10, 40))
    assert math.isfinite(frechet_distance(few, few + 1.0))
    assert frechet_distance(few, few + 1.0) == pytest.approx(40.0, rel=1e-6)  # a pure shift: ‖Δμ‖²
    big_a, big_b = rng.standard_normal((20000, 3)), rng.standard_normal((20000, 3)) * 2 + [1, 0, 0]
    assert frechet_distance(big_a, big_b) == pytest.approx(1 + 3 * (2 - 1) ** 2, rel=0.05)


# ------------------------------------------------------------------------------------ KID
def _mmd2_loops(x, y):
    """Unbiased MMD² with the cubic kernel, written as explicit sums over pairs."""
    d, m = x.shape[1], len(x)
    k = lambda u, v: (u @ v / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return xx + yy - 2 * xy


def test_kid_matches_the_pairwise_sum_on_a_full_subset():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((12, 4)) + 0.5
    mean, std = kid(x, y, subsets=1, subset_size=12)  # one subset holding every row
    assert mean == pytest.approx(_mmd2_loops(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_same_distribution_is_zero_within_its_std_and_shift_is_positive():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2000, 16)), rng.standard_normal((2000, 16))
    mean, std = kid(a, b, subsets=50, subset_size=500, seed=0)
    assert abs(mean) < std
    shifted_mean, shifted_std = kid(a, b + 0.5, subsets=50, subset_size=500, seed=0)
    assert shifted_mean > 10 * shifted_std > 0
    assert kid(a, b, subsets=5, subset_size=100, seed=7) == kid(a, b, subsets=5, subset_size=100, seed=7)


def test_kid_is_unbiased():
    rng = np.random.default_rng(5)
    vals = [kid(rng.standard_normal((20, 3)), rng.standard_normal((20, 3)), subsets=1, subset_size=20)[0]
            for _ in range(400)]
    se = np.std(vals, ddof=1) / math.sqrt(len(vals))
    assert abs(np.mean(vals)) < 4 * se
    assert min(vals) < 0 < max(vals)  # unbiased, hence sometimes negative


# ------------------------------------------------------------------------ precision/recall
def test_precision_recall_identical_disjoint_and_by_hand():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 8))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # by hand, 1-D: real 0..9 (k=1 radii 1), fake {0.5, 20} (k=1 radii 19.5)
    real, fake = np.arange(10.0)[:, None], np.array([[0.5], [20.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # k=3 radii of the real points are 3 (ends) ... so 12.5 is outside, 11.5 inside (9 + 3 >= 11.5)
    assert precision_recall(real, np.array([[11.5], [12.5], [-2.0], [-3.5]]), k=3)[0] == 0.5


# --------------------------------------------------------------------------------- PSNR/SSIM
def test_psnr_closed_form():
    ref = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.tensor([0.1, 0.01, 0.0], dtype=torch.float64).view(3, 1, 1, 1)
    out = psnr(ref + c, ref, data_range=1.0)
    assert out[0].item() == pytest.approx(20.0, abs=1e-9)  # 10 log10(1 / 0.01)
    assert out[1].item() == pytest.approx(40.0, abs=1e-9)
    assert math.isinf(out[2].item())
    assert psnr(2 * (ref + c) - 1, 2 * ref - 1, data_range=2.0)[:2].tolist() == pytest.approx(out[:2].tolist())


def _ssim_reference(x, y, data_range):
    """Wang et al. with scipy.ndimage (float64, one channel): Gaussian σ=1.5 truncated at 3.5σ
    (radius 5, an 11-tap window), the map cropped to the valid positions."""
    f = lambda z: scipy.ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s[5:-5, 5:-5].mean()


def test_ssim_identity_and_reference():
    rng = np.random.default_rng(7)
    x = rng.random((3, 2, 30, 27))
    y = np.clip(x + 0.15 * rng.standard_normal(x.shape), 0, 1)
    assert ssim(x, x, 1.0).tolist() == pytest.approx([1.0] * 3, abs=1e-12)
    ours = ssim(torch.from_numpy(x), torch.from_numpy(y), 1.0)
    ref = [np.mean([_ssim_reference(x[i, c], y[i, c], 1.0) for c in range(2)]) for i in range(3)]
    assert ours.tolist() == pytest.approx(ref, abs=1e-12)
    assert (ours < 1).all() and (ours > 0).all()


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(8)
    x = rng.random((2, 1, 32, 32)) * 2 - 1
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), -1, 1)
    ref = [metrics.structural_similarity(x[i, 0], y[i, 0], data_range=2.0, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False) for i in range(2)]
    assert ssim(x, y, 2.0).tolist() == pytest.approx(ref, abs=1e-12)


def test_bad_inputs_are_named():
    x = np.zeros((10, 4))
    with pytest.raises(QBayesError, match="NaN"):
        frechet_distance(np.full((10, 4), np.nan), x)
    with pytest.raises(QBayesError, match="different dimensions"):
        kid(x, np.zeros((10, 5)))
    with pytest.raises(QBayesError, match="more than 3"):
        precision_recall(x[:3], x)
    with pytest.raises(QBayesError, match="at least 2 rows"):
        frechet_distance(x[:1], x)
    with pytest.raises(QBayesError, match="data_range"):
        psnr(torch.zeros(1, 4), torch.zeros(1, 4), 0)
    with pytest.raises(QBayesError, match="window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 1.0)
    with pytest.raises(QBayesError, match="differ in shape"):
        ssim(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 15), 1.0)


# -------------------------------------------------------------- the Fashion-MNIST metric kit
def test_classifier_features_use_the_classifiers_training_convention():
    from qbayes.diffusion.metrics import classifier_features, fmnist_images, to_classifier_input
    from qbayes.data import load_image_dataset
    from qbayes.models.vision import load_vision

    x01, _ = load_image_dataset("fashion-mnist", "test", normalize=None)  # what the classifier trained on
    imgs = fmnist_images("test", 64)
    assert imgs.shape == (64, 1, 32, 32) and imgs.min() == -1 and imgs.max() <= 1
    assert torch.allclose(to_classifier_input(imgs), x01[:64], atol=1e-6)
    assert torch.equal(to_classifier_input(imgs), to_classifier_input(imgs[..., 2:30, 2:30]))
    feats = classifier_features(imgs, batch_size=20)
    net = load_vision("fmnist-mobilenet")
    with torch.no_grad():
        assert feats.shape == (64, 128)
        assert torch.allclose(net[-1](feats), net(x01[:64]), atol=1e-4)  # penultimate features
    with pytest.raises(QBayesError, match="NaN"):
        classifier_features(torch.full((2, 1, 32, 32), float("nan")))
    with pytest.raises(QBayesError, match="32, 32"):
        classifier_features(torch.zeros(2, 3, 32, 32))


def test_image_quality_small_sets():
    from qbayes.diffusion.metrics import classifier_features, fmnist_images, image_quality

    real = classifier_features(fmnist_images("test", 600))
    fake = classifier_features(fmnist_images("train", 300))
    good = image_quality(fake, real, min_samples=300, kid_subsets=20, kid_subset_size=200)
    bad = image_quality(fake * 0 + real[:300].mean(0) + 0.1 * torch.randn(300, 128, generator=torch.Generator().manual_seed(0)),
                        real, min_samples=300, kid_subsets=20, kid_subset_size=200)
    assert set(good) >= {"fid", "kid", "kid_std", "precision", "recall", "n"} and good["n"] == 300
    assert good["warning"] and "5000" in good["warning"] and "Inception" in good["feature_space"]
    assert good["precision"] > 0.7 and good["recall"] > 0.7 and abs(good["kid"]) < 3 * good["kid_std"] + 0.05
    assert bad["fid"] > 10 * good["fid"] and bad["kid"] > good["kid"] and bad["recall"] < 0.2
    with pytest.raises(QBayesError, match="min_samples=5000"):
        image_quality(fake, real)
    with pytest.raises(QBayesError, match="NaN"):
        image_quality(torch.full((300, 128), float("nan")), real, min_samples=300)


def _point_mass_eps(mu, schedule, offset=0.0):
    """The exact ε-model of data that is always ``mu``: ε = (x_t − √ᾱ_t μ)/√(1−ᾱ_t) (+ offset)."""
    def eps(x, t):
        a = schedule.abar(t, x)
        return (x - a.sqrt() * mu) / (1 - a).sqrt() + offset
    return eps


def test_paired_metrics_closed_forms():
    from qbayes.diffusion.metrics import paired_metrics
    from qbayes.diffusion.schedule import Schedule

    sched = Schedule.linear(1000)
    mu = torch.linspace(-0.5, 0.5, 16).view(1, 1, 4, 4)
    x_T = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ef = _point_mass_eps(mu, sched)
    same = paired_metrics(ef, ef, sched, x_T, steps=10, batch_size=4)
    assert same["eps_mse"] == [0.0] * 10 and math.isinf(same["psnr"]) and same["sample_mse"] == 0
    assert torch.allclose(same["x_float"], mu.expand(6, -1, -1, -1), atol=1e-5)  # DDIM recovers the point mass
    c = 0.05
    off = paired_metrics(ef, _point_mass_eps(mu, sched, c), sched, x_T, steps=10)
    assert off["eps_mse"] == pytest.approx([c * c] * 10, rel=1e-4)  # same inputs: exactly the offset²
    assert off["timesteps"] == sched.timesteps(10).tolist() and off["n"] == 6
    assert 0 < off["sample_mse"] and math.isfinite(off["psnr"]) and off["psnr_min"] <= off["psnr"]
    assert off["psnr_pooled"] == pytest.approx(10 * math.log10(4 / off["sample_mse"]))
    with pytest.raises(QBayesError, match="shaped like x_t"):
        paired_metrics(ef, lambda x, t: x[:, :, :2], sched, x_T, steps=2)


def test_ddpm_loader(tmp_path):
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from qbayes.diffusion.zoo import FMNIST_DDPM_CONFIG, FMNIST_DDPM_WEIGHTS, build_unet, load_fmnist_ddpm

    with pytest.raises(CheckpointError, match="train_ddpm.py"):
        load_fmnist_ddpm(tmp_path / "none.safetensors")
    unet = build_unet()
    path = tmp_path / "ddpm.safetensors"
    save_file(dict(unet.state_dict()), str(path), metadata={"unet_config": json.dumps(FMNIST_DDPM_CONFIG)})
    loaded, sched = load_fmnist_ddpm(path)
    assert sched.T == 1000 and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in unet.state_dict().items())
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in list(unet.state_dict().items())[1:]}, str(bad))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_fmnist_ddpm(bad)
    if FMNIST_DDPM_WEIGHTS.is_file():  # the shipped model, once trained
        assert FMNIST_DDPM_WEIGHTS.stat().st_size <= 25 * 2 ** 20
        shipped, _ = load_fmnist_ddpm()
        assert shipped(torch.zeros(2, 1, 32, 32), torch.tensor([0, 999])).sample.shape == (2, 1, 32, 32)
