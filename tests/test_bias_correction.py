"""Empirical bias correction: on one linear layer the corrected bias is the closed form
b + (W - Q) E[x], so the output mean matches the float layer's exactly; on a quantized CNN every
layer's per-channel output mean matches the float model's after correction, and the output error falls."""
import copy

import torch
from torch import nn

from qbayes import QuantSpec, quantize_
from qbayes.transforms import correct_bias


def test_one_layer_correction_is_the_closed_form():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 5))
    ref = copy.deepcopy(net)
    quantize_(net, QuantSpec(3, 0, symmetric=True, clip="minmax", scale_dtype="float32"), "rtn", progress=False)
    lin = net[0]
    q = lin.dequantize(torch.float64)
    x = torch.randn(64, 8) + 2.0
    b0 = lin.bias.double().clone()
    correct_bias(net, ref, [x[:32], x[32:]], progress=False)
    want = b0 + (ref[0].weight.double() - q) @ x.double().mean(0)
    assert torch.allclose(lin.bias.double(), want, atol=2e-3 * float(want.abs().max()))  # the bias is stored in float16


def test_cnn_layer_means_match_the_float_model_after_correction():
    torch.manual_seed(1)
    float_net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.rand(64, 3, 10, 10) * 3
    net = quantize_(copy.deepcopy(float_net), QuantSpec(3, 0, symmetric=True, clip="minmax", scale_dtype="float32"),
                    "rtn", convs=True, progress=False)
    with torch.no_grad():
        before = (net(x) - float_net(x)).mean(0).abs().max()
    shifts = correct_bias(net, float_net, x.split(16), progress=False)
    assert set(shifts) == {"0", "2", "5"} and max(shifts.values()) > 0
    with torch.no_grad():
        h_f, h_q = float_net[:3](x), net[:3](x)
        assert torch.allclose(h_q.mean((0, 2, 3)), h_f.mean((0, 2, 3)), atol=1e-2)
        assert (net(x) - float_net(x)).mean(0).abs().max() < 0.1 * before


def test_high_bias_absorption_preserves_the_function_and_shrinks_offsets():
    from qbayes.transforms import absorb_high_bias, fold_batchnorm
    from qbayes.transforms.graph import ChannelClip

    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    for bn in (net[1], net[4]):
        bn.bias.data = torch.rand(8) * 3 + 1  # large positive offsets: most activations sit above a floor
        bn.running_var.data = torch.rand(8) * 0.1 + 0.05
    net.eval()
    fold_batchnorm(net)
    calib, x = torch.randn(64, 3, 8, 8) * 0.3, torch.randn(32, 3, 8, 8)  # x also leaves the calibrated range
    with torch.no_grad():
        ref, floor = net(x), net[:3](calib).amin((0, 2, 3))
    moved = absorb_high_bias(net, calib.split(16))
    assert set(moved) == {"0->3", "3->6"} and all(v > 0 for v in moved.values())
    assert isinstance(net[2], ChannelClip)
    with torch.no_grad():
        assert torch.allclose(net(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        assert torch.allclose(net[:3](calib).amin((0, 2, 3)), floor - floor.clamp(min=0), atol=1e-5)
