import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from qbayes.bayes import metrics as M


def test_uniform_predictions_closed_forms():
    K, n = 7, 11
    probs = torch.full((n, K), 1 / K, dtype=torch.float64)
    y = torch.arange(n) % K
    assert math.isclose(M.nll(probs, y), math.log(K), rel_tol=1e-12)
    assert math.isclose(M.brier(probs, y), 1 - 1 / K, rel_tol=1e-6)
    assert math.isclose(M.predictive_entropy(probs)[0].item(), math.log(K), rel_tol=1e-12)


def test_ece_hand_example():
    # four predictions at confidence 0.8, three right: |0.75 - 0.8| = 0.05
    probs = torch.tensor([[0.8, 0.2]] * 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    assert math.isclose(M.ece(probs, y), 0.05, abs_tol=1e-12)
    assert math.isclose(M.ece(probs, y, adaptive=True, n_bins=1), 0.05, abs_tol=1e-12)
    # equal-mass bins split ties by position: {right, right} and {right, wrong} -> (0.2 + 0.3) / 2
    assert math.isclose(M.ece(probs, y, adaptive=True, n_bins=2), 0.25, abs_tol=1e-12)
    # two bins: conf 0.6 all right (gap 0.4), conf 0.9 all wrong (gap 0.9); weights 1/2 each
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1]], dtype=torch.float64)
    assert math.isclose(M.ece(probs, torch.tensor([0, 1])), 0.5 * 0.4 + 0.5 * 0.9, abs_tol=1e-12)


def test_ece_of_a_calibrated_predictor_is_small():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    c = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    right = torch.rand(n, generator=g, dtype=torch.float64) < c
    probs = torch.stack([c, 1 - c], 1)
    y = torch.where(right, 0, 1)
    assert M.ece(probs, y) < 0.01 and M.ece(probs, y, adaptive=True) < 0.01
    # a predictor that is always 99% sure but right with probability c is not
    sure = torch.tensor([[0.99, 0.01]]).expand(n, 2)
    assert M.ece(sure, y) > 0.2


@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.lists(st.integers(0, 5), min_size=1, max_size=30))
def test_auroc_equals_pairwise_definition(neg, pos):
    a, b = torch.tensor(neg, dtype=torch.float64), torch.tensor(pos, dtype=torch.float64)
    pairwise = ((b[:, None] > a[None, :]).double() + 0.5 * (b[:, None] == a[None, :]).double()).mean()
    assert math.isclose(M.auroc(a, b), pairwise.item(), abs_tol=1e-12)


def test_ood_auroc_separates_confident_from_uncertain():
    sure = torch.tensor([[0.98, 0.01, 0.01]] * 5)
    unsure = torch.tensor([[0.4, 0.3, 0.3]] * 5)
    assert M.ood_auroc(sure, unsure) == 1.0
    assert M.ood_auroc(unsure, sure) == 0.0


def test_gaussian_nll_and_rmse_closed_form():
    m = torch.zeros(4)
    assert math.isclose(M.gaussian_nll(m, torch.ones(4), m), 0.5 * math.log(2 * math.pi), rel_tol=1e-12)
    assert math.isclose(M.gaussian_nll(m, torch.full((4,), 4.0), torch.full((4,), 2.0)),
                        0.5 * (math.log(2 * math.pi) + math.log(4) + 1), rel_tol=1e-12)
    assert M.rmse(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])) == pytest.approx(math.sqrt(12.5))


def test_bad_shapes():
    with pytest.raises(ValueError, match="expected probs"):
        M.nll(torch.ones(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no predictions"):
        M.ece(torch.ones(0, 2), torch.zeros(0, dtype=torch.long))
