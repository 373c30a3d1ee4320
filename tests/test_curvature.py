import hypothesis.strategies as st
import torch
from hypothesis import given

from qbayes.curvature import InputSecondMoment


@given(st.lists(st.integers(0, 17), min_size=1, max_size=6), st.integers(1, 9), st.integers(0, 1000))
def test_running_second_moment_equals_batch_formula(chunks, dim, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, dim, generator=g, dtype=torch.float64) for n in chunks]
    stat = InputSecondMoment(dim, dtype=torch.float64)
    for x in xs:
        stat.update(x.reshape(1, n, dim) if (n := x.shape[0]) else x)
    X = torch.cat(xs)
    assert stat.n == X.shape[0]
    if stat.n:
        torch.testing.assert_close(stat.H, 2 * X.T @ X / X.shape[0], rtol=1e-12, atol=1e-12)


def test_merge_equals_single_pass():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    s1, s2, s = (InputSecondMoment(4, dtype=torch.float64) for _ in range(3))
    s1.update(a), s2.update(b), s.update(torch.cat([a, b]))
    s1.merge(s2)
    torch.testing.assert_close(s1.H, s.H)
