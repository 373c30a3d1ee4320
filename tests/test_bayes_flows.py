"""Planar/radial flows (exact log-determinants), flow VI against a known Gaussian, the test energies."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbayes.bayes import energies, flows
from qbayes.errors import QBayesError

F64 = torch.float64


def random_layers(kind, d, K, seed):
    """Layer parameters far from the identity (the near-identity init would make the test easy)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    if kind == "planar":
        return {"u": 1.5 * r(K, d), "w": r(K, d), "b": r(K)}
    return {"z0": r(K, d), "alpha_raw": r(K), "beta_raw": 2 * r(K)}


def jacobian_logdet(fn, z):
    """log|det J| of ``fn`` at each row of ``z``, with torch.func."""
    J = torch.func.vmap(torch.func.jacrev(fn))(z)
    return torch.linalg.slogdet(J)[1]


@pytest.mark.parametrize("kind", flows.KINDS)
@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_layer_logdet_matches_jacobian(kind, d, seed):
    layer = {k: v[0] for k, v in random_layers(kind, d, 1, seed).items()}
    fn = flows.planar if kind == "planar" else flows.radial
    z = 2 * torch.randn(64, d, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
    out, logdet = fn(layer, z)
    assert out.shape == z.shape and logdet.shape == (64,)
    want = jacobian_logdet(lambda x: fn(layer, x)[0], z)
    torch.testing.assert_close(logdet, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", flows.KINDS)
@pytest.mark.parametrize("d", [1, 2, 5])
def test_stacked_flow_is_the_composition_of_layers_and_its_logdet_is_exact(kind, d):
    params = random_layers(kind, d, 6, seed=d)
    z = torch.randn(40, d, generator=torch.Generator().manual_seed(7), dtype=F64)
    zK, logdet = flows.flow(params, z)
    fn = flows.planar if kind == "planar" else flows.radial
    x, total = z, torch.zeros(40, dtype=F64)
    for k in range(6):
        x, ld = fn({n: v[k] for n, v in params.items()}, x)
        total = total + ld
    torch.testing.assert_close(zK, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, total, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet, jacobian_logdet(lambda v: flows.flow(params, v)[0], z), rtol=1e-8, atol=1e-8)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(lambda d: st.tuples(
    st.lists(st.floats(-50, 50), min_size=d, max_size=d),
    st.lists(st.floats(-50, 50), min_size=d, max_size=d).filter(lambda w: sum(x * x for x in w) > 1e-6))))
def test_planar_u_hat_keeps_the_map_invertible(uw):
    u, w = (torch.tensor(x, dtype=F64) for x in uw)
    u_hat = flows.planar_u_hat(u, w)
    assert float(w @ u_hat) >= -1.0 - 1e-9


@pytest.mark.parametrize("kind", flows.KINDS)
def test_init_is_near_identity_and_seeded(kind):
    spec = flows.FlowSpec(kind, dim=3, n_layers=8)
    p1, p2 = spec.init(seed=4, dtype=F64), spec.init(seed=4, dtype=F64)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    z = torch.randn(50, 3, dtype=F64)
    zK, logdet = flows.flow(p1, z)
    assert (zK - z).abs().max() < 0.1 and logdet.abs().max() < 0.1
    with pytest.raises(QBayesError, match="kind"):
        flows.FlowSpec("affine", 2, 2)


def gaussian_target(m, s):
    return lambda z: -0.5 * (((z - m) / s) ** 2).sum(-1)


@pytest.mark.parametrize("kind", flows.KINDS)
def test_flow_vi_reaches_log_z_of_a_gaussian(kind):
    m, s = torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([0.5, 1.5], dtype=F64)
    log_z = float(torch.log(s * math.sqrt(2 * math.pi)).sum())
    target = gaussian_target(m, s)
    steps = 400
    tr = flows.build(target, dim=2, n_layers=2, kind=kind, n_samples=128,
                     lr=lambda t: 0.05 * 0.5 * (1 + math.cos(math.pi * t / steps)))
    state = tr.init(seed=0, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        state = tr.update(state, gen, inplace=True)
    assert state.step == steps and math.isfinite(float(state.log_posterior))
    value = flows.elbo(state, target, 20_000, torch.Generator().manual_seed(1))
    assert log_z - 0.05 < value <= log_z + 0.01, (value, log_z)
    z, log_q = flows.sample(state, 20_000, torch.Generator().manual_seed(2))
    torch.testing.assert_close(z.mean(0), m, atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), s, rtol=0.06, atol=0)
    assert log_q.shape == (20_000,)


@pytest.mark.parametrize("kind", flows.KINDS)
def test_functional_and_inplace_updates_agree(kind):
    target = gaussian_target(torch.tensor([0.3, 0.1]), torch.tensor([1.0, 2.0]))
    tr = flows.build(target, dim=2, n_layers=3, kind=kind, lr=0.05, n_samples=16)
    torch.manual_seed(0)
    s = tr.init(seed=1)
    s_before = copy.deepcopy(s)
    s2 = tr.update(tr.update(s, None), None)
    assert all(torch.equal(s.params[k], s_before.params[k]) for k in s.params)  # input left alone
    assert all(torch.equal(s.extras["m"][k], s_before.extras["m"][k]) for k in s.params)
    torch.manual_seed(0)
    t = tr.init(seed=1)
    t_obj = t
    t = tr.update(tr.update(t, None, inplace=True), None, inplace=True)
    assert t is t_obj and t.step == s2.step == 2
    assert torch.equal(t.log_posterior, s2.log_posterior)
    for k in s2.params:
        assert torch.equal(s2.params[k], t.params[k])
        assert torch.equal(s2.extras["m"][k], t.extras["m"][k]) and torch.equal(s2.extras["v"][k], t.extras["v"][k])
    # a generator and the same noise passed explicitly give the same step
    a = tr.update(tr.init(seed=1), torch.Generator().manual_seed(5))
    b = tr.update(tr.init(seed=1), torch.randn(16, 2, generator=torch.Generator().manual_seed(5)))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_bad_inputs_raise_clear_errors():
    tr = flows.build(lambda z: -z.sum(), dim=2, n_layers=1)
    with pytest.raises(QBayesError, match="one value per sample"):
        tr.update(tr.init(), None)
    tr = flows.build(gaussian_target(0.0, 1.0), dim=2, n_layers=1)
    with pytest.raises(QBayesError, match="shape"):
        tr.update(tr.init(), torch.randn(4, 3))
    with pytest.raises(QBayesError, match="lack"):
        tr.init({"mu": torch.zeros(2)})


@pytest.mark.parametrize("rule,n", [("trapezoid", 1000), ("simpson", 1001)])
def test_quadrature_log_z_of_a_gaussian_matches_closed_form(rule, n):
    m, s, lim = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.8, 1.3], dtype=F64), 4.0
    U = lambda z: 0.5 * (((z - m) / s) ** 2).sum(-1)  # noqa: E731
    std = torch.distributions.Normal(0.0, 1.0)
    mass = std.cdf((lim - m) / s) - std.cdf((-lim - m) / s)  # the box cuts the tails
    want = float(torch.log(s * math.sqrt(2 * math.pi) * mass).sum())
    assert energies.log_partition(U, lim=lim, n=n, rule=rule) == pytest.approx(want, abs=1e-6)


def test_energies_shapes_and_finite_log_z():
    z = torch.randn(7, 2)
    for name, U in energies.ENERGIES.items():
        assert U(z).shape == (7,), name
        log_z = energies.log_partition(U, n=201)  # h = 0.04
        assert math.isfinite(log_z), name
        # the wall leaves the density inside the box alone and adds only a little mass outside
        boxed = energies.boxed(U, lim=4.0, width=0.05)
        inside = 7.9 * torch.rand(50, 2, dtype=F64) - 3.95
        torch.testing.assert_close(boxed(inside), U(inside))
        assert -1e-3 < energies.log_partition(boxed, lim=4.6, n=231) - log_z < 0.05, name
    # U1 is a proper density: the box holds essentially all of its mass
    assert energies.log_partition(energies.u1, lim=6.0, n=301) == pytest.approx(energies.log_partition(energies.u1, n=201), abs=1e-4)
    with pytest.raises(QBayesError, match="odd"):
        energies.log_partition(energies.u1, n=10, rule="simpson")


def test_zero_layers_is_plain_gaussian_vi():
    tr = flows.build(gaussian_target(torch.tensor([1.0, 2.0]), 1.0), dim=2, n_layers=0, lr=0.1, n_samples=8)
    s = tr.init()
    s = tr.update(s, torch.Generator().manual_seed(0))
    assert s.params["u"].shape == (0, 2) and torch.isfinite(s.log_posterior)
