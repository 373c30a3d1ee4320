"""Packed convolutions: QuantConv2d computes the float64 convolution of its dequantized kernel
(strides, padding, dilation, groups), per-group im2col moments equal a per-channel float64
reference, GPTQ on convolutions beats RTN on its own objective, and conv checkpoints round-trip."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qbayes import QuantSpec, load_quantized, quantize_, save_quantized
from qbayes.algorithms import get_solver, layer_objective
from qbayes.curvature import grouped_conv_moment
from qbayes.errors import CheckpointError, QBayesError
from qbayes.nn import QuantConv2d, weight_matrix


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups,gs", [
    (3, 8, 3, 1, 0, 1, 1, -1), (4, 6, 3, 2, 1, 1, 1, 12), (8, 8, 3, 1, 1, 1, 8, -1), (6, 4, (1, 3), 1, (0, 1), 2, 2, -1)])
def test_quant_conv_is_the_convolution_of_its_dequantized_kernel(cin, cout, k, stride, pad, dil, groups, gs):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, groups)
    spec = QuantSpec(4, gs, scale_dtype="float32")
    qw = get_solver("rtn").fn(weight_matrix(conv).detach(), None, spec)
    q = QuantConv2d.from_quantized(qw, spec, conv, bias_dtype=torch.float32)
    x = torch.randn(2, cin, 9, 9)
    w = qw.dequantize(torch.float64).view_as(conv.weight)
    ref = F.conv2d(x.double(), w, conv.bias.double(), stride, pad, dil, groups)
    assert torch.allclose(q(x).double(), ref, atol=1e-5)
    assert q.storage_bytes() < conv.weight.numel() * 4


def test_grouped_conv_moment_equals_a_per_channel_reference():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)
    xs = [torch.randn(3, 4, 6, 6) for _ in range(2)]
    H = grouped_conv_moment(conv, xs, dtype=torch.float64)
    for g in range(4):
        rows = torch.cat([F.unfold(x[:, g:g + 1].double(), 3, padding=1).transpose(1, 2).reshape(-1, 9) for x in xs])
        assert torch.allclose(H[g], 2 * rows.T @ rows / len(rows), atol=1e-12)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                         nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def test_gptq_on_convolutions_beats_rtn_on_the_layer_objective():
    x = torch.randn(64, 1, 10, 10, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(3, -1)
    rtn, gptq = quantize_(_cnn(), spec, "rtn", convs=True, progress=False), _cnn()
    quantize_(gptq, spec, "gptq", x, convs=True, progress=False)
    assert sum(isinstance(m, QuantConv2d) for m in gptq.modules()) == 3
    ref = _cnn()
    h = F.relu(ref[0](x))
    cols = F.unfold(h.double(), 3).transpose(1, 2).reshape(-1, 8, 9)  # depthwise: per-channel patches
    for c in range(8):
        H = 2 * cols[:, c].T @ cols[:, c] / len(cols)
        w = weight_matrix(ref[2]).double()[c:c + 1]
        e_g = layer_objective(w, gptq[2].dequantize(torch.float64).reshape(8, 9)[c:c + 1], H)
        e_r = layer_objective(w, rtn[2].dequantize(torch.float64).reshape(8, 9)[c:c + 1], H)
        assert e_g <= e_r * (1 + 1e-9)
    with torch.no_grad():
        want = ref(x)
        assert (gptq(x) - want).square().mean() < (rtn(x) - want).square().mean()


def test_conv_checkpoints_reload_identically_and_check_geometry(tmp_path):
    x = torch.randn(8, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    m = quantize_(_cnn(), QuantSpec(4, -1), "gptq", x, convs=True, progress=False)
    save_quantized(m, tmp_path / "c")
    loaded, _ = load_quantized(tmp_path / "c", model=_cnn())
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    other = _cnn()
    other[2] = nn.Conv2d(8, 8, 3, groups=8, padding=1)
    with pytest.raises(CheckpointError, match="convolution"):
        load_quantized(tmp_path / "c", model=other)


def test_conv_specs_that_cannot_fit_are_refused():
    with pytest.raises(QBayesError, match="does not divide the input dimension 9"):
        quantize_(_cnn(), QuantSpec(4, 32), "rtn", convs=True, progress=False)
    with pytest.raises(QBayesError, match="grouped convolution"):
        quantize_(_cnn(), QuantSpec(4, 0), "gptq", torch.randn(4, 1, 10, 10), convs=True, progress=False)
    with pytest.raises(QBayesError, match="zero padding"):
        m = _cnn()
        m[0] = nn.Conv2d(1, 8, 3, padding="same")
        quantize_(m, QuantSpec(4, -1), "rtn", convs=True, progress=False)
