"""DDIM / DDPM / DDIM inversion against diffusers' schedulers on a tiny random UNet, step by step;
DDIM on Gaussian data against its closed form; DDIM(η=1, every step) against DDPM; inversion
round trips whose error shrinks with the steps; hooks, the timestep recorder and the
calibration sets; and the errors bad input gets."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qbayes.diffusion import (Schedule, TimestepRecorder, calibration_batches, ddim_invert, ddim_sample, ddpm_sample,
                              eps_model_of, naive_calibration_batches, schedule_of)
from qbayes.errors import QBayesError

G = torch.Generator


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def unet():
    pytest.importorskip("diffusers")
    return tiny_unet()


def gaussian_eps(schedule, m, s):
    """The exact noise prediction E[ε | x_t] for data N(m, s² I)."""
    def eps(x, t):
        a = schedule.abar(t, x)
        return (x - a.sqrt() * m) * (1 - a).sqrt() / (a * s ** 2 + 1 - a)
    return eps


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _x(shape=(2, 1, 8, 8), seed=1, dtype=torch.float32):
    return torch.randn(shape, generator=G().manual_seed(seed), dtype=dtype)


def _states(into):
    return lambda step, t, x, eps: into.append((step, int(t), x.clone(), eps.clone()))


# ------------------------------------------------------------------- against diffusers
@pytest.mark.parametrize("eta,steps", [(0.0, 10), (1.0, 7), (0.5, 10)])
def test_ddim_matches_diffusers_ddim_scheduler_step_by_step(unet, eta, steps):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=100, clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon",
                        timestep_spacing="leading")
    ref.set_timesteps(steps)
    x, want, g = _x(), [], G().manual_seed(5)
    with torch.no_grad():
        for t in ref.timesteps:
            want.append((int(t), x))
            x = ref.step(unet(x, t).sample, t, x, eta=eta, generator=g).prev_sample
        got = []
        out = ddim_sample(eps_model_of(unet), schedule_of(ref), _x(), steps, eta=eta, generator=G().manual_seed(5),
                          hooks=_states(got))
    assert [t for _, t, _, _ in got] == [t for t, _ in want]
    for (_, _, xs, _), (_, w) in zip(got, want):
        assert rel(xs, w) < 1e-5
    assert rel(out, x) < 1e-5


def test_ddpm_matches_diffusers_ddpm_scheduler_with_the_same_noise(unet):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=20, variance_type="fixed_small", clip_sample=False)
    x, g = _x(), G().manual_seed(7)
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(unet(x, t).sample, t, x, generator=g).prev_sample
        seen = []
        out = ddpm_sample(eps_model_of(unet), schedule_of(ref), _x(), generator=G().manual_seed(7), hooks=_states(seen))
    assert [t for _, t, _, _ in seen] == list(range(19, -1, -1))
    assert rel(out, x) < 1e-5


def test_ddim_invert_matches_diffusers_inverse_scheduler(unet):
    from diffusers import DDIMInverseScheduler

    ref = DDIMInverseScheduler(num_train_timesteps=100, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(10)
    x = _x()
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(unet(x, t).sample, t, x).prev_sample
        seen = []
        out = ddim_invert(eps_model_of(unet), schedule_of(ref), _x(), 10, hooks=_states(seen))
    assert [t for _, t, _, _ in seen] == list(range(0, 100, 10))
    assert rel(out, x) < 1e-5


def test_eps_model_of_is_the_unet_sample_and_passes_gradients(unet):
    x = _x().requires_grad_()
    t = torch.tensor([3, 70])
    eps = eps_model_of(unet)(x, t)
    torch.testing.assert_close(eps, unet(x, t).sample, rtol=0, atol=0)
    eps.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_schedule_of_takes_the_betas_and_refuses_other_predictions():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    S = schedule_of(ref)
    torch.testing.assert_close(S.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-6, atol=0)
    with pytest.raises(QBayesError, match="v_prediction"):
        schedule_of(diffusers.DDIMScheduler(prediction_type="v_prediction"))
    with pytest.raises(QBayesError, match="betas"):
        schedule_of(object())


# ------------------------------------------------------------------------- closed forms
@settings(max_examples=30, deadline=None)
@given(m=st.floats(-2, 2), s=st.floats(0.1, 3), steps=st.integers(1, 40), cosine=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_ddim_on_gaussian_data_is_its_closed_form_map(m, s, steps, cosine, seed):
    """With the exact ε of N(m, s²), one η=0 step from ᾱ_a to ᾱ_b scales the standardised
    sample z = (x − √ᾱ m)/√(ᾱs² + 1 − ᾱ) by cos(θ_a − θ_b), θ(ᾱ) = atan2(√(1−ᾱ), s√ᾱ)."""
    S = Schedule.cosine(200) if cosine else Schedule.linear(200)
    x_T = _x((5, 3), seed, torch.float64)
    levels = [float(S.alphas_cumprod[t]) for t in S.timesteps(steps)] + [1.0]
    theta = [math.atan2(math.sqrt(1 - a), s * math.sqrt(a)) for a in levels]
    gain = math.prod(math.cos(a - b) for a, b in zip(theta, theta[1:]))
    a0 = levels[0]
    want = m + s * gain * (x_T - math.sqrt(a0) * m) / math.sqrt(a0 * s * s + 1 - a0)
    torch.testing.assert_close(ddim_sample(gaussian_eps(S, m, s), S, x_T, steps), want, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(m=st.floats(-2, 2), s=st.floats(0.1, 3), t=st.integers(0, 199), seed=st.integers(0, 2 ** 16))
def test_gaussian_eps_gives_the_posterior_mean_through_tweedie(m, s, t, seed):
    """The test's exact ε model: Tweedie's x̂_0 from it is E[x_0 | x_t] = m + √ᾱ s² (x_t − √ᾱ m)/(ᾱs² + 1 − ᾱ)."""
    S = Schedule.linear(200)
    x = _x((4, 2), seed, torch.float64)
    a = float(S.alphas_cumprod[t])
    want = m + math.sqrt(a) * s * s * (x - math.sqrt(a) * m) / (a * s * s + 1 - a)
    got = S.predict_x0(x, gaussian_eps(S, m, s)(x, torch.full((4,), t)), t)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_ddim_with_eta_one_over_every_step_is_ddpm():
    """Song et al.: η = 1 on the full grid is DDPM's ancestral sampler (same noise, same sample)."""
    S = Schedule.linear(60)
    em = gaussian_eps(S, 0.3, 0.8)
    x_T = _x((6, 4), 2, torch.float64)
    a = ddim_sample(em, S, x_T, 60, eta=1.0, generator=G().manual_seed(3))
    b = ddpm_sample(em, S, x_T, generator=G().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(a, ddim_sample(em, S, x_T, 60))  # the noise did enter


@pytest.mark.parametrize("cosine", [False, True])
def test_inversion_then_sampling_returns_x0_with_an_error_shrinking_with_steps(cosine):
    S = Schedule.cosine(1000) if cosine else Schedule.linear(1000)
    m, s = 0.5, 0.7
    em = gaussian_eps(S, m, s)
    x0 = m + s * _x((32, 3), 0, torch.float64)
    errs = [float((ddim_sample(em, S, ddim_invert(em, S, x0, k), k) - x0).abs().max()) for k in (10, 40, 160)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.05 and errs[0] / errs[2] > 6, errs


def test_ddim_eta_zero_is_deterministic_and_ignores_the_generator():
    S = Schedule.linear(100)
    em = gaussian_eps(S, 0.0, 1.5)
    x_T = _x((3, 2, 4, 4), 4)
    state = torch.get_rng_state()
    a = ddim_sample(em, S, x_T, 20, generator=G().manual_seed(0))
    b = ddim_sample(em, S, x_T, 20, generator=G().manual_seed(123))
    c = ddim_sample(em, S, x_T, 20)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(torch.get_rng_state(), state)
    assert a.dtype == torch.float32
    d = ddim_sample(em, S, x_T, 20, eta=0.5, generator=G().manual_seed(0))
    assert torch.equal(d, ddim_sample(em, S, x_T, 20, eta=0.5, generator=G().manual_seed(0)))
    assert not torch.equal(d, ddim_sample(em, S, x_T, 20, eta=0.5, generator=G().manual_seed(1)))


def test_hooks_see_each_model_call_in_order():
    S = Schedule.linear(50)
    em = gaussian_eps(S, 0.1, 1.0)
    x_T, seen = _x((2, 3)), []
    ddim_sample(em, S, x_T, 5, hooks=_states(seen), progress=True)
    assert [(i, t) for i, t, _, _ in seen] == list(enumerate(S.timesteps(5).tolist()))
    for _, t, x, eps in seen:
        torch.testing.assert_close(eps, em(x, torch.full((2,), t)))
    assert torch.equal(seen[0][2], x_T)
    calls = []
    ddim_invert(em, S, x_T, 5, hooks=[_states(calls), lambda *a: calls.append("second")])
    assert calls[1] == "second" and [c[1] for c in calls[::2]] == [0, 10, 20, 30, 40]


# ----------------------------------------------------------------------- calibration sets
def test_recorder_keeps_a_bounded_seeded_sample_of_the_trajectory():
    S = Schedule.linear(100)
    em = gaussian_eps(S, 0.2, 0.9)
    x_T, full = _x((10, 1, 2, 2)), []
    rec = TimestepRecorder(per_step=3, every=2, seed=4)
    ddim_sample(em, S, x_T, 10, hooks=[rec, _states(full)])
    assert len(rec) == 3 * 5
    (x, t), = rec.batches()
    grid = S.timesteps(10).tolist()
    assert t.tolist() == [g for g in grid[::2] for _ in range(3)]
    for k, step in enumerate(range(0, 10, 2)):  # each kept row is a row of that step's state
        state = full[step][2].flatten(1)
        for row in x[3 * k:3 * k + 3].flatten(1):
            assert (state == row).all(1).any()
    assert not torch.equal(x[0:3], x[3:6])
    assert [b[0].shape[0] for b in rec.batches(4)] == [4, 4, 4, 3]


def test_calibration_batches_are_deterministic_and_independent_of_chunking():
    S = Schedule.linear(100)
    em = gaussian_eps(S, -0.3, 1.2)
    kw = dict(steps=10, per_step=4, every=3, seed=7)
    a = calibration_batches(em, S, 9, (1, 2, 2), batch_size=5, **kw)
    b = calibration_batches(em, S, 9, (1, 2, 2), batch_size=5, **kw)
    c = calibration_batches(em, S, 9, (1, 2, 2), batch_size=100, **kw)  # one trajectory chunk
    cat = lambda bs: (torch.cat([x for x, _ in bs]), torch.cat([t for _, t in bs]))  # noqa: E731
    assert [x.shape[0] for x, _ in a] == [5, 5, 5, 1] and all(t.dtype == torch.long for _, t in a)
    for u, v in zip(cat(a), cat(b)):
        assert torch.equal(u, v)
    for u, v in zip(cat(a), cat(c)):
        assert torch.equal(u, v)
    x, t = cat(a)
    assert sorted(set(t.tolist()), reverse=True) == S.timesteps(10).tolist()[::3]
    # the rows of the first recorded step are rows of the seeded noise itself
    x_T = torch.randn((9, 1, 2, 2), generator=G().manual_seed(7))
    assert all((x_T.flatten(1) == r).all(1).any() for r in x[:4].flatten(1))
    other = cat(calibration_batches(em, S, 9, (1, 2, 2), batch_size=5, **{**kw, "seed": 8}))[0]
    assert not torch.equal(other, x)


def test_naive_calibration_is_one_timestep_and_stops_there():
    S = Schedule.linear(100)
    m = gaussian_eps(S, 0.0, 1.0)
    calls = []
    em = lambda x, t: (calls.append(int(t[0])), m(x, t))[1]  # noqa: E731
    first = naive_calibration_batches(em, S, 6, (3,), steps=10, seed=2, batch_size=4)
    x, t = torch.cat([b[0] for b in first]), torch.cat([b[1] for b in first])
    assert (t == 90).all() and torch.equal(x, torch.randn((6, 3), generator=G().manual_seed(2)))
    calls.clear()
    mid = naive_calibration_batches(em, S, 6, (3,), t=70, steps=10, seed=2, batch_size=4)
    assert calls == [90, 80, 70] * 2  # two trajectory chunks, each stopped at t = 70
    assert all((b[1] == 70).all() for b in mid) and sum(b[0].shape[0] for b in mid) == 6
    with pytest.raises(QBayesError, match="not on the 10-step DDIM grid"):
        naive_calibration_batches(em, S, 6, (3,), t=75, steps=10)


# ------------------------------------------------------------------------------- errors
def test_bad_input_is_named():
    S = Schedule.linear(20)
    em = gaussian_eps(S, 0.0, 1.0)
    x = _x((2, 3))
    with pytest.raises(QBayesError, match="NaN/Inf"):
        ddim_sample(em, S, x.clone().index_fill_(1, torch.tensor([0]), float("nan")), 5)
    with pytest.raises(QBayesError, match="NaN/Inf"):
        ddpm_sample(em, S, torch.full((2, 3), float("inf")))
    with pytest.raises(QBayesError, match="eta"):
        ddim_sample(em, S, x, 5, eta=-0.1)
    with pytest.raises(QBayesError, match="eta"):
        ddim_sample(em, S, x, 5, eta=1.5)
    for steps in (0, 21, 2.0):
        with pytest.raises(QBayesError, match="steps"):
            ddim_sample(em, S, x, steps)
        with pytest.raises(QBayesError, match="steps"):
            ddim_invert(em, S, x, steps)
    with pytest.raises(QBayesError, match=r"shape \(2, 1\) for x_t of shape \(2, 3\)"):
        ddim_sample(lambda x, t: x[:, :1], S, x, 5)
    with pytest.raises(QBayesError, match="not a tensor"):
        ddpm_sample(lambda x, t: (x,), S, x)
    with pytest.raises(QBayesError, match="floating-point"):
        ddim_invert(em, S, torch.zeros(2, 3, dtype=torch.long), 5)
    with pytest.raises(QBayesError, match="hooks"):
        ddim_sample(em, S, x, 5, hooks=[1])
    with pytest.raises(QBayesError, match="shape"):
        calibration_batches(em, S, 4, (0, 3), steps=5)
    with pytest.raises(QBayesError, match="per_step"):
        calibration_batches(em, S, 4, (3,), steps=5, per_step=0)
    with pytest.raises(QBayesError, match="kept nothing"):
        TimestepRecorder().batches()
