"""Sensitivity criteria on a tiny Llama, each checked against an independent computation."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qbayes import QuantSpec
from qbayes.api import select_layers
from qbayes.errors import CalibrationError, QBayesError
from qbayes.mixed import criteria as C
from qbayes.mixed.measured import measured_increase
from qbayes.mixed.pqi import gauss_legendre_01, pqi
from qbayes.mixed.sensitivity import SensitivityTable, rtn_deltas, sensitivity, spearman
from qbayes.curvature import LayerStatistics, collect
from qbayes.models import adapter_for

from .conftest import VOCAB, tiny_llama

SPEC = QuantSpec(bits=4, group_size=16)


@pytest.fixture
def setup():
    torch.set_num_threads(1)
    model = tiny_llama(seed=3).double()
    batches = list(torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(5)).split(2))
    layers = select_layers(model, SPEC)
    return model, batches, layers


def next_token_loss(logits, ids, reduction="mean"):
    """Cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]`` (independent of qbayes)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction=reduction)


def _loss(model, batches):
    with torch.no_grad():
        return sum(float(next_token_loss(model(input_ids=b).logits, b)) for b in batches) / len(batches)


def test_measured_matches_full_forward(setup):
    model, batches, layers = setup
    deltas = rtn_deltas(layers, SPEC, (2, 3), progress=False)
    names = list(layers)[::3]
    meas = measured_increase(model, {n: layers[n] for n in names}, batches,
                             {n: {b: deltas[b][n] for b in (2, 3)} for n in names}, progress=False)
    base = _loss(model, batches)
    for n in names:
        for b in (2, 3):
            w0 = layers[n].weight.detach().clone()
            with torch.no_grad():
                layers[n].weight.add_(deltas[b][n])
            ref = _loss(model, batches) - base
            with torch.no_grad():
                layers[n].weight.copy_(w0)
            assert meas[n][b] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert _loss(model, batches) == base  # weights and blocks restored


def test_pqi_integrates_to_the_joint_loss_change(setup):
    model, batches, layers = setup
    deltas = rtn_deltas(layers, SPEC, (2,), progress=False)[2]
    before = _loss(model, batches)
    per = pqi(model, layers, batches, deltas, nodes=8, progress=False)
    with torch.no_grad():
        for n, lin in layers.items():
            lin.weight.add_(deltas[n])
    after = _loss(model, batches)
    with torch.no_grad():
        for n, lin in layers.items():
            lin.weight.sub_(deltas[n])
    assert sum(per.values()) == pytest.approx(after - before, rel=1e-6)
    assert _loss(model, batches) == pytest.approx(before, rel=1e-12)


def test_gauss_legendre_is_exact_for_polynomials():
    t, w = gauss_legendre_01(3)
    for k in range(6):  # exact up to degree 2n-1
        assert sum(wi * ti ** k for ti, wi in zip(t, w)) == pytest.approx(1 / (k + 1), rel=1e-12)


def test_statistics_against_per_position_outer_products(setup):
    model, batches, layers = setup
    name = "model.layers.1.mlp.down_proj"
    stats = collect(adapter_for(model), {name: layers[name]}, batches, want=("H", "G", "ef_diag", "ggn_diag"))[name]
    xs, outs = [], []
    def grab(_m, a, o):
        xs.append(a[0])
        outs.append(o)

    h = layers[name].register_forward_hook(grab)
    ef, n_tok, H = 0, 0, 0
    try:
        for ids in batches:
            xs.clear(), outs.clear()
            loss = next_token_loss(model(input_ids=ids).logits, ids, "sum")
            (d,) = torch.autograd.grad(loss, outs)
            per_pos = torch.einsum("bso,bsi->bsoi", d, xs[0].detach())  # δ_s x_sᵀ per position
            ef = ef + per_pos.square().sum((0, 1))
            H = H + torch.einsum("bsi,bsj->ij", xs[0].detach(), xs[0].detach())
            n_tok += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        h.remove()
    n_rows = sum(b.numel() for b in batches)
    torch.testing.assert_close(stats.ef_diag.double(), (ef / n_tok).float().double(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(stats.H.double(), (2 * H / n_rows).float().double(), rtol=1e-4, atol=1e-7)
    dW = torch.randn_like(layers[name].weight)
    assert C.output(dW, stats) > 0
    # K-FAC: G ⊗ A is symmetric PSD, and the posterior form is positive
    assert torch.linalg.eigvalsh(stats.G.double()).min() > -1e-6
    assert C.posterior(dW, stats, layers[name].weight, "kron") > 0
    assert C.posterior(dW, stats, layers[name].weight, "diag") > 0


def test_output_criterion_is_twice_mean_squared_output_error():
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64)
    dW = torch.randn(4, 6, dtype=torch.float64)
    H = 2 * x.T @ x / 50
    stats = LayerStatistics(H=H, G=torch.eye(4), ef_diag=torch.zeros(4, 6), ggn_diag=torch.zeros(4, 6))
    assert C.output(dW, stats) == pytest.approx(2 * float((x @ dW.T).square().sum(1).mean()), rel=1e-12)
    # posterior (kron): ½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) against the explicit Kronecker product
    G = torch.randn(4, 4, dtype=torch.float64)
    G = G @ G.T
    stats.G = G
    P = torch.kron(G, H / 2)
    d = dW.reshape(-1)
    W = torch.randn(4, 6, dtype=torch.float64)
    lam = W.numel() / float(W.square().sum())
    ref = 0.5 * float(d @ P @ d + lam / 1000 * d @ d)
    assert C.posterior(dW, stats, W, "kron", num_data=1000) == pytest.approx(ref, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.floats(-10, 10, allow_nan=False)), min_size=3, max_size=30))
def test_spearman_matches_scipy(pairs):
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    ref = scipy_stats.spearmanr(a, b).statistic
    got = spearman(a, b)
    if ref != ref:  # constant input: undefined
        assert got != got
    else:
        assert got == pytest.approx(ref, abs=1e-9)


def test_table_roundtrip_and_errors(setup, tmp_path):
    model, batches, layers = setup
    table = sensitivity(model, batches, criteria=("hawq", "fisher", "output", "posterior", "pqi", "measured"), bits=(2, 4),
                        spec=SPEC, progress=False)
    assert set(table.layers) == set(layers) and table.bits == (2, 4)
    for c in ("fisher", "output", "posterior"):
        for n in table.layers:  # more bits, smaller perturbation, smaller predicted increase
            assert table.costs(c)[n][2] > table.costs(c)[n][4] > 0
    p = table.save(tmp_path / "sens.json")
    again = SensitivityTable.load(p)
    assert again.scores == table.scores and again.sizes == table.sizes
    assert -1 <= again.spearman("fisher", 2) <= 1
    assert set(table.info["hessian_trace"]) == set(layers)
    with pytest.raises(QBayesError, match="not computed"):
        table.costs("magic")
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(QBayesError, match="not a qbayes sensitivity table"):
        SensitivityTable.load(tmp_path / "bad.json")
    with pytest.raises(QBayesError, match="unknown criteria"):
        sensitivity(model, batches, criteria=("magic",), spec=SPEC)
    with pytest.raises(CalibrationError, match="empty"):
        sensitivity(model, [], spec=SPEC)
    with pytest.raises(QBayesError, match="bit-width"):
        sensitivity(model, batches, bits=(1, 4), spec=SPEC)
