"""Checkpoints keep activation quantizers: a model saved after quantize_activations_ (static or
dynamic, SmoothQuant, NoisyQuant noise, attention points) and quantize_ reloads to the same
outputs, bit for bit; a checkpoint whose activation entries do not fit the model is refused."""
import copy
import json

import pytest
import torch
from torch import nn

from qbayes import ActSpec, QuantSpec, load_quantized, quantize_, quantize_activations_, save_quantized
from qbayes.errors import CheckpointError
from qbayes.io.validate import META_HASH, meta_digest
from qbayes.models.vision import ViT
from qbayes.nn.act_quant import ActQuant


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def _data(n=128):
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(1))
    x[:, 2] *= 30
    return x


@pytest.mark.parametrize("aspec,smooth", [(ActSpec(8), None), (ActSpec(8), "search"),
                                          (ActSpec(8, "per-token", dynamic=True), 0.5)])
def test_mlp_round_trip_is_exact(tmp_path, aspec, smooth):
    model, calib = _mlp(), list(_data().split(32))
    quantize_activations_(model, aspec, calib, smoothquant=smooth, progress=False)
    quantize_(model, QuantSpec(bits=4, group_size=-1), "gptq", calib, progress=False)
    x = _data(64)
    ref = model(x)
    save_quantized(model, tmp_path / "m")
    loaded, _ = load_quantized(tmp_path / "m", model=_mlp())
    assert isinstance(loaded[0].input_quant, ActQuant) and loaded[0].input_quant.spec == aspec
    assert torch.equal(loaded(x), ref)
    if smooth is not None:
        assert loaded[0].input_quant.smooth is not None


@pytest.mark.parametrize("aspec", [ActSpec(6), ActSpec(6, "per-channel")])
def test_noisyquant_noise_round_trips_bit_for_bit(tmp_path, aspec):
    from qbayes.transforms.noisyquant import noise_for, uniform_draw

    model, calib = _mlp(), list(_data().split(32))
    points = quantize_activations_(model, aspec, calib, smoothquant="search", progress=False)
    for name, q in points.items():
        q.noise = noise_for(q, uniform_draw(model.get_submodule(name).in_features, 0, name), 1.5)
    quantize_(model, QuantSpec(bits=4, group_size=-1), "gptq", calib, progress=False)
    x = _data(64)
    ref = model(x)
    save_quantized(model, tmp_path / "m")
    loaded, _ = load_quantized(tmp_path / "m", model=_mlp())
    for name in points:
        want, got = model.get_submodule(name).input_quant.noise, loaded.get_submodule(name).input_quant.noise
        assert want is not None and float(want.abs().max()) > 0 and torch.equal(got, want)
    assert torch.equal(loaded(x), ref)


def test_vit_attention_points_round_trip(tmp_path):
    def vit():
        torch.manual_seed(0)
        return ViT(image=8, patch=4, dim=16, depth=2, heads=2, mlp=32).eval()

    model, calib = vit(), [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))]
    quantize_activations_(model, ActSpec(6), calib, exclude=("*embed*",), matmuls=ActSpec(6),
                          softmax=ActSpec(4, format="logsqrt2"), progress=False)
    quantize_(model, QuantSpec(bits=6, group_size=-1), "rtn", exclude=("*embed*",), float_dtype="float32",
              progress=False)
    x = torch.randn(4, 1, 8, 8)
    ref = model(x)
    save_quantized(model, tmp_path / "v")
    loaded, _ = load_quantized(tmp_path / "v", model=vit())
    names = [n for n, m in loaded.named_modules() if isinstance(m, ActQuant)]
    assert any(n.endswith("probs_point") for n in names) and any(n.endswith("q_point") for n in names)
    assert torch.equal(loaded(x), ref)


def _rewrite(folder, edit):
    meta_path = folder / "qbayes.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta.pop(META_HASH)
    meta[META_HASH] = meta_digest(meta)
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["activations"].update({"9": m["activations"]["0"]}), "no layer"),
    (lambda m: m["activations"]["0"]["spec"].update(bits=12), "invalid format"),
    (lambda m: m["activations"]["0"].update(kind="other"), "malformed"),
])
def test_foreign_activation_entries_are_refused(tmp_path, edit, match):
    model, calib = _mlp(), list(_data().split(32))
    quantize_activations_(model, ActSpec(8), calib, progress=False)
    quantize_(model, QuantSpec(bits=8, group_size=-1), "rtn", progress=False)
    save_quantized(model, tmp_path / "m")
    _rewrite(tmp_path / "m", edit)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(tmp_path / "m", model=_mlp())


def test_uncalibrated_quantizer_is_not_saved(tmp_path):
    model = _mlp()
    quantize_(model, QuantSpec(bits=8, group_size=-1), "rtn", progress=False)
    model[0].input_quant = ActQuant(ActSpec(8))
    with pytest.raises(CheckpointError, match="not calibrated"):
        save_quantized(copy.deepcopy(model), tmp_path / "m")
