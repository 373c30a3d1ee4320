"""Function-preserving rewrites (issue 14): batch-norm folding and cross-layer equalisation leave a
MobileNetV2-style network's outputs unchanged, and equalisation gives each pair equal ranges."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qbayes.errors import QBayesError
from qbayes.transforms import ChannelClip, chains, equalize, fold_batchnorm


class InvertedResidual(nn.Module):
    def __init__(self, c, expand=4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))  # the residual reads x: no chain across it


def mobilenet_like(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        InvertedResidual(8), InvertedResidual(8),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    for mod in m.modules():  # non-trivial statistics, and channel ranges that differ a lot
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.2, 3)
            mod.weight.data.uniform_(0.1, 3)
            mod.bias.data.uniform_(-1, 1)
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            mod.weight.data *= torch.logspace(-1.5, 1.0, mod.weight.shape[0]).view(-1, *[1] * (mod.weight.dim() - 1))
    return m.eval()


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def test_bn_fold_then_cle_preserve_the_function():
    m = mobilenet_like()
    x = torch.randn(16, 1, 28, 28)
    ref = m(x)
    folded = fold_batchnorm(m)
    assert len(folded) == 8 and not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert _rel(m(x), ref) < 1e-5
    pairs = equalize(m)
    assert ("4", "5") not in pairs  # the residual output is read twice: never a pair
    assert {("3.expand.0", "3.dw.0"), ("3.dw.0", "3.project.0"), ("4.dw.0", "4.project.0")} <= set(pairs)
    assert ("5", "10") not in pairs  # pooling and flatten sit between them
    assert ("10", "12") in pairs
    assert any(isinstance(mod, ChannelClip) for mod in m.modules())  # ReLU6 became a per-channel clip
    assert _rel(m(x), ref) < 1e-5


def test_equalised_pairs_have_equal_channel_ranges():
    m = mobilenet_like(1)
    fold_batchnorm(m)
    equalize(m, max_sweeps=1)  # one sweep: the last pair of each chain is exactly equal after it
    w1, w2 = m[10].weight, m[12].weight
    torch.testing.assert_close(w1.abs().amax(1), w2.abs().amax(0), rtol=1e-5, atol=0)
    m2 = mobilenet_like(1)
    fold_batchnorm(m2)
    equalize(m2)  # swept to convergence: every pair
    for c in chains(m2):
        if c.consumer and c.consumer == "3.dw.0":
            r1 = m2.get_submodule(c.producer).weight.abs().flatten(1).amax(1)
            r2 = m2.get_submodule(c.consumer).weight.abs().flatten(1).amax(1)
            torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), hidden=st.integers(1, 12), clip=st.booleans())
def test_cle_on_random_mlps_is_exact(seed, hidden, clip):
    torch.manual_seed(seed)
    act = nn.ReLU6() if clip else nn.ReLU()
    m = nn.Sequential(nn.Linear(5, hidden), act, nn.Linear(hidden, 3)).double().eval()
    with torch.no_grad():
        m[0].weight.mul_(torch.logspace(-3, 3, hidden, dtype=torch.float64).view(-1, 1))
    x = 4 * torch.randn(64, 5, dtype=torch.float64)
    ref = m(x)
    equalize(m)
    assert _rel(m(x), ref) < 1e-12
    torch.testing.assert_close(m[0].weight.abs().amax(1), m[2].weight.abs().amax(0), rtol=1e-10, atol=1e-300)


def test_fold_needs_eval_mode_and_running_stats():
    m = mobilenet_like().train()
    with pytest.raises(QBayesError, match="eval mode"):
        fold_batchnorm(m)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    with pytest.raises(QBayesError, match="running statistics"):
        fold_batchnorm(m)


def test_cle_refuses_an_unfolded_batch_norm():
    with pytest.raises(QBayesError, match="fold_batchnorm first"):
        equalize(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1)).eval())


def test_an_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(2, 2)

        def forward(self, x):
            return self.l(x) if x.sum() > 0 else x
    with pytest.raises(QBayesError, match="cannot trace"):
        equalize(Branchy())


def test_repq_reparameterisation_preserves_a_vit_and_aligns_post_norm_channels():
    from qbayes.models.vision import ViT
    from qbayes.transforms import reparameterize_layernorms

    torch.manual_seed(0)
    vit = ViT(image=8, patch=4, dim=16, depth=2, heads=2, mlp=32).eval()
    with torch.no_grad():
        for blk in vit.blocks:  # LayerNorm gains that differ a lot between channels, as in trained ViTs
            blk.norm1.weight.mul_(torch.logspace(-1, 1, 16)[torch.randperm(16)])
            blk.norm1.bias.add_(torch.randn(16))
    calib, x = torch.rand(32, 1, 8, 8), torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ref = vit(x)
    done = reparameterize_layernorms(vit, calib.split(8))
    assert set(done) == {f"blocks.{i}.norm{j}" for i in range(2) for j in (1, 2)} | {"norm"}
    with torch.no_grad():
        assert torch.allclose(vit(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        seen = []
        h = vit.blocks[0].norm1.register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1, 16)))
        vit(calib)
        h.remove()
    y = torch.cat(seen)
    lo, hi = y.amin(0), y.amax(0)  # every channel now spans the same interval on the calibration data
    assert torch.allclose(lo, lo.mean().expand(16), atol=1e-4) and torch.allclose(hi, hi.mean().expand(16), atol=1e-4)


def test_repq_refuses_a_norm_whose_output_also_feeds_a_residual():
    from qbayes.errors import QBayesError
    from qbayes.transforms import reparameterize_layernorms

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.lin = nn.LayerNorm(6), nn.Linear(6, 6)

        def forward(self, x):
            y = self.ln(x)
            return self.lin(y) + y

    torch.manual_seed(0)
    m = Skip()
    with torch.no_grad():
        m.ln.weight.mul_(torch.logspace(-1, 1, 6))
    x = torch.randn(16, 6)
    ref = m(x).detach()
    with pytest.raises(QBayesError, match="restored"):
        reparameterize_layernorms(m, [x])
    assert torch.equal(m(x).detach(), ref)
