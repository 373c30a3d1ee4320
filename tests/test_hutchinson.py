"""Hutchinson block traces against exact Hessians computed here with torch.func.

Ground truth is independent of the module: ``torch.func.hessian`` of a ``functional_call``
of the network, or closed forms for quadratics ``0.5 zᵀ A z`` (Hessian ``A``).
"""
import itertools
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.func import functional_call, hessian

from qbayes.curvature.hutchinson import TraceEstimate, exact_block_traces, hutchinson_trace
from qbayes.errors import QBayesError

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_mlp(seed=0, n=32, loss="mse"):
    """Linear(5,7)-tanh-Linear(7,3) in float64, a fixed batch, and its loss ``lf(net(x), y)``."""
    g = gen(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    x = torch.randn(n, 5, generator=g, dtype=F64)
    if loss == "mse":  # targets near the outputs: Gauss-Newton-dominated, all block traces well above 0
        with torch.no_grad():
            y = net(x) + 0.1 * torch.randn(n, 3, generator=g, dtype=F64)
        lf = nn.functional.mse_loss
    else:
        y = torch.randint(0, 3, (n,), generator=g)
        lf = nn.functional.cross_entropy
    return net, x, y, lf


def exact_traces(net, lf, x, y):
    """Per-parameter ``tr(H_kk)`` of ``lf(net(x), y)`` from the full functional Hessian."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    H = hessian(lambda p: lf(functional_call(net, p, (x,)), y))(params)
    return {k: H[k][k].reshape(v.numel(), v.numel()).diagonal().sum().item() for k, v in params.items()}


def quadratic(A, shapes):
    """Blocks of the given shapes and ``loss(_) = 0.5 zᵀ A z`` with ``z`` their concatenation."""
    g = gen(99)
    params = {f"b{i}": torch.randn(s, generator=g, dtype=F64).requires_grad_() for i, s in enumerate(shapes)}

    def loss(_):
        z = torch.cat([p.reshape(-1) for p in params.values()])
        return 0.5 * z @ A @ z
    return params, loss


def block_traces(A, shapes):
    out, i = {}, 0
    for j, s in enumerate(shapes):
        n = math.prod(s)
        out[f"b{j}"] = A[i:i + n, i:i + n].trace().item()
        i += n
    return out


# --------------------------------------------------------------------------- MLP vs exact Hessian

def test_mlp_estimates_match_exact_hessian_and_converge():
    net, x, y, lf = make_mlp()
    params = dict(net.named_parameters())
    exact = exact_traces(net, lf, x, y)
    big = hutchinson_trace(lambda _: lf(net(x), y), params, n_samples=4000, generator=gen(1))
    small = hutchinson_trace(lambda _: lf(net(x), y), params, n_samples=40, generator=gen(2))
    for k, ex in exact.items():
        e = big[k]
        assert isinstance(e, TraceEstimate) and len(e.samples) == 4000 and e.numel == params[k].numel()
        assert abs(e.mean - ex) < 4 * e.se, (k, e.mean, ex, e.se)
        assert abs(e.mean - ex) < 0.05 * abs(ex), (k, e.mean, ex)
        assert e.mean == pytest.approx(sum(e.samples) / 4000, rel=1e-12)
        assert e.per_param == pytest.approx(e.mean / e.numel)
    err_big = sorted(abs(big[k].mean - ex) for k, ex in exact.items())
    err_small = sorted(abs(small[k].mean - ex) for k, ex in exact.items())
    median = lambda v: (v[1] + v[2]) / 2  # noqa: E731  (4 blocks)
    assert median(err_big) < median(err_small)
    assert all(big[k].se < small[k].se for k in exact)  # se ~ 1/sqrt(n): 10x smaller at 100x probes


def test_cross_entropy_mlp_within_four_standard_errors():
    # Indefinite Hessian: the first layer's traces are near 0, so only the z-score is meaningful.
    net, x, y, lf = make_mlp(seed=3, loss="ce")
    exact = exact_traces(net, lf, x, y)
    est = hutchinson_trace(lambda _: lf(net(x), y), dict(net.named_parameters()), n_samples=1000,
                           generator=gen(4), distribution="gaussian")
    for k, ex in exact.items():
        assert abs(est[k].mean - ex) < 4 * est[k].se, (k, est[k].mean, ex, est[k].se)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_exact_block_traces_match_functorch_hessian(loss):
    net, x, y, lf = make_mlp(seed=5, loss=loss)
    exact = exact_traces(net, lf, x, y)
    got = exact_block_traces(lambda _: lf(net(x), y), dict(net.named_parameters()))
    assert list(got) == list(exact)
    for k in exact:
        assert got[k] == pytest.approx(exact[k], rel=1e-10, abs=1e-12)


def test_exact_block_traces_fallback_without_batched_grads(monkeypatch):
    net, x, y, lf = make_mlp(seed=6)
    exact = exact_traces(net, lf, x, y)
    original = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    got = exact_block_traces(lambda _: lf(net(x), y), dict(net.named_parameters()))
    for k in exact:
        assert got[k] == pytest.approx(exact[k], rel=1e-10, abs=1e-12)


# --------------------------------------------------------------------------- several batches

def test_two_batches_give_the_trace_of_the_mean_loss():
    net, x, y, lf = make_mlp(seed=7, n=32)
    params = dict(net.named_parameters())
    halves = [(x[:16], y[:16]), (x[16:], y[16:])]
    loss_fn = lambda b: lf(net(b[0]), b[1])  # noqa: E731
    exact = exact_traces(net, lf, x, y)  # equal halves: mean of the batch means = mean over all rows
    ref = exact_block_traces(loss_fn, params, halves)
    for k in exact:
        assert ref[k] == pytest.approx(exact[k], rel=1e-10)
    both = hutchinson_trace(loss_fn, params, iter(halves), n_samples=600, generator=gen(8))
    one = [hutchinson_trace(loss_fn, params, [h], n_samples=600, generator=gen(8)) for h in halves]
    for k in exact:  # the same probe on every batch: per-probe samples average exactly
        want = [(a + b) / 2 for a, b in zip(one[0][k].samples, one[1][k].samples)]
        assert both[k].samples == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert abs(both[k].mean - exact[k]) < 4 * both[k].se


# --------------------------------------------------------------------------- quadratics 0.5 zᵀ A z

def test_rademacher_is_exact_on_a_diagonal_hessian_gaussian_is_not():
    shapes = [(4,), (2, 3)]
    A = torch.diag(torch.linspace(-2.0, 3.0, 10, dtype=F64))
    params, loss = quadratic(A, shapes)
    truth = block_traces(A, shapes)
    rad = hutchinson_trace(loss, params, n_samples=50, generator=gen(0))
    gau = hutchinson_trace(loss, params, n_samples=50, generator=gen(0), distribution="gaussian")
    for k, tr in truth.items():
        assert rad[k].samples == pytest.approx([tr] * 50, rel=1e-12, abs=1e-12)
        assert rad[k].se < 1e-12
        assert gau[k].se > 0.05 and len(set(gau[k].samples)) == 50


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_coupled_quadratic_blocks_unbiased(distribution):
    g = gen(11)
    M = torch.randn(9, 9, generator=g, dtype=F64)
    A = M + M.T + 6 * torch.eye(9, dtype=F64)  # couplings inside and across blocks
    shapes = [(3,), (2, 2), (2,)]
    params, loss = quadratic(A, shapes)
    est = hutchinson_trace(loss, params, n_samples=2000, generator=gen(12), distribution=distribution)
    for k, tr in block_traces(A, shapes).items():
        assert abs(est[k].mean - tr) < 4 * est[k].se, (k, est[k].mean, tr, est[k].se)
    exact = exact_block_traces(loss, params)
    assert exact == pytest.approx(block_traces(A, shapes), rel=1e-12)


def test_constant_gradient_block_has_zero_trace():
    w = torch.randn(3, 2, dtype=F64, requires_grad=True)
    u = torch.randn(4, dtype=F64, requires_grad=True)
    c = torch.randn(3, 2, dtype=F64)
    loss = lambda _: (w * c).sum() + (u ** 2).sum()  # noqa: E731  linear in w: its Hessian block is 0
    est = hutchinson_trace(loss, {"w": w, "u": u}, n_samples=5, generator=gen(0))
    assert est["w"].samples == [0.0] * 5 and est["u"].mean == pytest.approx(8.0)
    assert exact_block_traces(loss, {"w": w, "u": u}) == pytest.approx({"w": 0.0, "u": 8.0})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=6), st.integers(1, 6), st.integers(0, 10**6))
def test_rademacher_exact_for_any_diagonal(diag, n_samples, seed):
    A = torch.diag(torch.tensor(diag, dtype=F64))
    params, loss = quadratic(A, [(len(diag),)])
    est = hutchinson_trace(loss, params, n_samples=n_samples, generator=gen(seed))["b0"]
    tr = sum(diag)
    assert est.samples == pytest.approx([tr] * n_samples, abs=1e-12 * (1 + sum(map(abs, diag))))
    assert math.isnan(est.se) if n_samples == 1 else est.se <= 1e-12 * (1 + sum(map(abs, diag)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10**6))
def test_rademacher_samples_are_sign_vector_quadratic_forms(d, seed):
    M = torch.randn(d, d, generator=gen(seed), dtype=F64)
    A = M + M.T
    forms = [(v @ A @ v).item() for s in itertools.product([-1.0, 1.0], repeat=d)
             for v in [torch.tensor(s, dtype=F64)]]
    assert math.fsum(forms) / len(forms) == pytest.approx(A.trace().item(), abs=1e-9)  # E over all 2^d signs
    params, loss = quadratic(A, [(d,)])
    for s in hutchinson_trace(loss, params, n_samples=4, generator=gen(seed))["b0"].samples:
        assert min(abs(s - f) for f in forms) < 1e-9


# --------------------------------------------------------------------------- reproducibility

def test_same_seed_same_samples():
    net, x, y, lf = make_mlp(seed=13)
    params = dict(net.named_parameters())
    run = lambda s, **kw: hutchinson_trace(lambda _: lf(net(x), y), params, n_samples=8, generator=gen(s), **kw)  # noqa: E731
    a, b, c = run(21), run(21), run(22)
    assert all(a[k].samples == b[k].samples for k in params)
    assert all(a[k].samples != c[k].samples for k in params)
    torch.manual_seed(5)
    d = hutchinson_trace(lambda _: lf(net(x), y), params, n_samples=3, progress=True)
    torch.manual_seed(5)
    e = hutchinson_trace(lambda _: lf(net(x), y), params, n_samples=3)
    assert all(d[k].samples == e[k].samples for k in params)


# --------------------------------------------------------------------------- errors

def test_errors_raise_qbayes_error():
    w = torch.randn(3, dtype=F64, requires_grad=True)
    v = torch.randn(3, dtype=F64, requires_grad=True)
    loss = lambda _: (w ** 2).sum()  # noqa: E731
    for n in (0, -1, 2.5, True):
        with pytest.raises(QBayesError, match="n_samples"):
            hutchinson_trace(loss, {"w": w}, n_samples=n)
    with pytest.raises(QBayesError, match="distribution"):
        hutchinson_trace(loss, {"w": w}, distribution="normal")
    with pytest.raises(QBayesError, match="non-empty"):
        hutchinson_trace(loss, {})
    with pytest.raises(QBayesError, match="'frozen' does not require grad"):
        hutchinson_trace(loss, {"w": w, "frozen": torch.ones(2)})
    with pytest.raises(QBayesError, match="floating-point"):
        hutchinson_trace(loss, {"w": w, "idx": torch.ones(2, dtype=torch.long)})
    with pytest.raises(QBayesError, match="same tensor"):
        hutchinson_trace(loss, {"w": w, "tied": w})
    with pytest.raises(QBayesError, match=r"does not depend on params \['v'\]"):
        hutchinson_trace(loss, {"w": w, "v": v})
    with pytest.raises(QBayesError, match="any of the params"):
        hutchinson_trace(lambda _: torch.tensor(1.0), {"w": w})
    with pytest.raises(QBayesError, match="batch 1 is not finite"):
        hutchinson_trace(lambda b: (w ** 2).sum() * b, {"w": w}, [1.0, math.inf])
    with pytest.raises(QBayesError, match="scalar"):
        hutchinson_trace(lambda _: w ** 2, {"w": w})
    with pytest.raises(QBayesError, match="empty"):
        hutchinson_trace(loss, {"w": w}, [])
    with pytest.raises(QBayesError, match="empty"):
        exact_block_traces(loss, {"w": w}, iter([]))
    big = torch.zeros(20001, requires_grad=True)
    with pytest.raises(QBayesError, match="20000"):
        exact_block_traces(lambda _: (big ** 2).sum(), {"big": big})
    assert issubclass(QBayesError, ValueError)
