"""GPTQ against an independent column-by-column implementation, in float64."""
import pytest
import torch

from qbayes.algorithms import gptq, layer_objective, rtn
from qbayes.errors import QBayesError
from qbayes.ranges import choose_params
from qbayes.spec import QuantSpec


def problem(rows=24, cols=64, n=400, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    X[:, list(dead)] = 0
    H = 2 * X.T @ X / n
    return W, H


def plain_gptq(W, H, spec, damp=0.01, act_order=False):
    """Optimal Brain Quantization one column at a time, with an explicit inverse (no Cholesky
    trick, no blocks): after quantizing column j, update the remaining columns with
    -(w_j - q_j) / [H^-1]_jj * [H^-1]_{j, k} and drop j from H^-1 (Schur complement)."""
    W, H = W.clone(), H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    d = torch.diag(H).clone()
    g = cols if spec.group_size == -1 else spec.group_size
    order = torch.argsort(d, descending=True) if act_order else torch.arange(cols)
    params = {}
    if act_order or g == cols:
        for k in range(cols // g):
            params[k] = choose_params(W[:, k * g:(k + 1) * g], spec, weight=d[k * g:(k + 1) * g])
    Hd = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(Hd)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    remaining = list(order.tolist())
    while remaining:
        j = remaining.pop(0)
        k = j // g
        if k not in params:  # first column of its group reached: range from current weights
            params[k] = choose_params(W[:, k * g:(k + 1) * g], spec, weight=d[k * g:(k + 1) * g])
        s, z = params[k]
        c = spec.fmt.encode(W[:, j], s, z, spec.bits).to(torch.uint8)
        codes[:, j] = c
        err = (W[:, j] - spec.fmt.decode(c, s, z)) / Hinv[j, j]
        rest = torch.tensor(remaining, dtype=torch.long)
        if len(remaining):
            W[:, rest] -= torch.outer(err, Hinv[j, rest])
            Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes


@pytest.mark.parametrize("spec,act_order,block", [
    (QuantSpec(4, 16, clip="minmax"), False, 128),
    (QuantSpec(4, 16, clip="minmax"), False, 20),
    (QuantSpec(3, 32, clip="mse"), False, 32),
    (QuantSpec(2, -1, clip="minmax"), False, 16),
    (QuantSpec(4, 16, symmetric=True, clip="mse"), True, 24),
    (QuantSpec(3, -1, clip="mse"), True, 128),
    (QuantSpec(4, 16, clip="minmax", format="nf4"), False, 20),
    (QuantSpec(4, 32, clip="mse", format="nf4"), True, 24),
])
def test_blocked_gptq_equals_plain_column_by_column(spec, act_order, block):
    W, H = problem(dead=(5, 40))
    got = gptq(W, H, spec, block_size=block, act_order=act_order)
    want = plain_gptq(W, H, spec, act_order=act_order)
    assert torch.equal(got.codes, want), (got.codes != want).sum()


@pytest.mark.parametrize("bits,group,fmt", [(2, 16, "int"), (3, 32, "int"), (4, -1, "int"), (8, 64, "int"),
                                            (4, 16, "nf4"), (4, -1, "nf4")])
def test_gptq_lowers_layer_objective_below_rtn(bits, group, fmt):
    W, H = problem(seed=bits)
    spec = QuantSpec(bits, group, clip="minmax", format=fmt)
    e_g = layer_objective(W, gptq(W, H, spec).dequantize(torch.float64), H)
    e_r = layer_objective(W, rtn(W, None, spec).dequantize(torch.float64), H)
    assert e_g < e_r


def test_dead_inputs_are_zeroed_and_finite():
    W, H = problem(dead=(0, 3, 63))
    qw = gptq(W, H, QuantSpec(4, 16))
    Q = qw.dequantize(torch.float64)
    assert torch.isfinite(Q).all()
    assert torch.all(Q[:, [0, 3, 63]] == 0)


def test_layer_objective_closed_form():
    # tr(D H D^T) with D = e_1 e_2^T, H = diag(1, 5) -> H_22 = 5
    W = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    H = torch.diag(torch.tensor([1.0, 5.0], dtype=torch.float64))
    assert layer_objective(W, torch.zeros_like(W), H).item() == 5.0


def test_gptq_refuses_bad_weights():
    W, H = problem()
    W[1, 2] = float("nan")
    with pytest.raises(QBayesError, match="NaN"):
        gptq(W, H, QuantSpec(4, 16))
    W, H = problem()
    with pytest.raises(QBayesError, match=r"valid group sizes are \[8, 16, 32, 64\]"):
        gptq(W, H, QuantSpec(4, 48))
    with pytest.raises(ValueError, match="expected"):
        gptq(W, H[:10, :10], QuantSpec(4, 16))
