"""Low-rank branch (SVDQuant), TDQ's timestep-dependent ranges and split quantization."""
import torch
from torch import nn

from qbayes.diffusion.quantize import SplitActQuant
from qbayes.diffusion.tdq import TimestepActQuant, TimestepClock
from qbayes.nn.act_quant import ActQuant
from qbayes.spec import ActSpec
from qbayes.transforms.lowrank import lowrank_factors, split_lowrank_


def test_lowrank_split_preserves_a_conv_and_a_linear_in_float():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.Linear(7, 4)
    x, z = torch.randn(2, 6, 9, 9), torch.randn(3, 7)
    ref_c, ref_l = conv(x), lin(z)
    rep = split_lowrank_({"c": conv, "l": lin}, 2)
    assert torch.allclose(conv(x), ref_c, atol=1e-5) and torch.allclose(lin(z), ref_l, atol=1e-5)
    assert rep["c"]["rank"] == 2 and 0 < rep["c"]["residual_rel"] < 1


def test_lowrank_factors_are_the_eckart_young_best_approximation():
    W = torch.randn(8, 5, dtype=torch.float64)
    down, up = lowrank_factors(W, 2)
    S = torch.linalg.svdvals(W)
    assert torch.isclose((W - up @ down).norm(), S[2:].norm())


def test_tdq_reproduces_per_timestep_minmax_ranges():
    clock = TimestepClock()
    q = TimestepActQuant(ActSpec(8), clock, T=1000, fit_steps=1500)
    ts = torch.arange(0, 1000, 100)
    for t in ts.tolist():  # activation range grows linearly with t
        clock.t = torch.full((4,), t)
        q(torch.linspace(-1, 1, 4).view(4, 1) * (1 + t / 100) * torch.ones(4, 3))
    q.freeze()
    lo, hi = q.ranges(ts)
    assert torch.allclose(hi, 1 + ts / 100, rtol=0.03, atol=0.05) and torch.allclose(lo, -(1 + ts / 100), rtol=0.03, atol=0.05)


def test_split_quantizer_gives_each_part_its_own_range():
    q = SplitActQuant(ActQuant(ActSpec(4), 1), ActQuant(ActSpec(4), 1), 2)
    x = torch.cat([torch.rand(3, 2, 4, 4) * 100, torch.rand(3, 2, 4, 4) * 0.01], 1)
    q(x)
    q.freeze()
    err = (q(x) - x).abs()
    assert float(err[:, 2:].max()) < 0.01 / 15 and float(err[:, :2].max()) < 100 / 15
