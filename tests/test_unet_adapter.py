"""The UNet2DModel adapter on a tiny random UNet: family recognition without importing diffusers,
structure and the timestep path, (x_t, t[, eps]) batches, the ε-regression likelihood, and
weight (RTN, GPTQ, convolutions included) and activation quantization through it, calibrated on
DDIM trajectories. The generic contract runs on it too (its entry in test_adapters.CASES)."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from qbayes import ActSpec, QuantSpec, quantize_, quantize_activations_
from qbayes.diffusion import calibration_batches, eps_model_of, schedule_of
from qbayes.errors import CalibrationError, QBayesError
from qbayes.models import ModuleAdapter, UNetAdapter, adapter_for
from qbayes.nn import QuantConv2d, QuantLinear
from qbayes.nn.act_quant import ActQuant

from .test_diffusion_sampling import tiny_unet

pytest.importorskip("diffusers")
G = torch.Generator


def _batch(n=6, seed=0, eps=False):
    g = G().manual_seed(seed)
    x, t = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g)
    return (x, t, torch.randn(n, 1, 8, 8, generator=g)) if eps else (x, t)


@pytest.fixture
def unet():
    return tiny_unet()


def test_qbayes_imports_without_diffusers_and_recognises_the_family_by_name(unet):
    code = "import sys, qbayes, qbayes.models, qbayes.diffusion; print('diffusers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
    assert type(adapter_for(unet)) is UNetAdapter
    assert type(adapter_for(nn.Sequential(nn.Linear(2, 2)))) is ModuleAdapter

    class Wrapped(nn.Module):  # a model that declares itself a UNet2DModel through its config
        config = {"_class_name": "UNet2DModel"}
    assert UNetAdapter.matches(Wrapped()) and not UNetAdapter.matches(nn.Conv2d(1, 1, 1))


def test_structure_and_the_timestep_path(unet):
    ad = adapter_for(unet)
    assert ad.blocks() == [("", unet)] and ad.likelihood == "regression" and ad.attention_points() == []
    every = {n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(ad.layers(exclude=[])) == every
    time = ad.time_embedding_layers()
    assert time[:2] == ["time_embedding.linear_1", "time_embedding.linear_2"]
    assert set(time[2:]) == {n for n in every if n.endswith("time_emb_proj")} and len(time) == 10
    # the default exclude (*embed*) keeps the time-embedding MLP in float, not the projections
    assert set(ad.layers()) == every - {"time_embedding.linear_1", "time_embedding.linear_2"}
    quantize_(unet, QuantSpec(8, -1), "rtn", include=["time_embedding.*"], exclude=[], progress=False)
    assert ad.time_embedding_layers() == time  # packed layers are still named


def test_batches_split_and_are_checked(unet):
    ad = adapter_for(unet)
    x, t, e = _batch(eps=True)
    parts = ad.batches((x, t, e), batch_size=4)
    assert [len(p) for p in parts] == [3, 3] and [ad.rows(p) for p in parts] == [4, 2]
    assert torch.equal(torch.cat([p[2] for p in parts]), e)
    assert len(ad.batches([(x, t), (x[:2], t[:2])], batch_size=1)) == 2  # a list of batches is kept as it is
    (one,) = ad.batches((x, 7))
    assert one[1].dtype == torch.long and one[1].tolist() == [7] * 6
    bad = {"no timesteps": x, "integer timesteps": (x, t.float()), "one timestep per image": (x, t[:3]),
           ">= 0": (x, t - 2000), "target_eps": (x, t, e[:, :, :4]), "float images": (x[0], t[:1]),
           r"\(x_t, t\)": [(x,)]}
    for msg, data in bad.items():
        with pytest.raises(CalibrationError, match=msg):
            ad.batches(data)


def test_outputs_and_loss_are_the_eps_regression(unet):
    ad = adapter_for(unet)
    x, t, e = _batch(4, eps=True)
    with torch.no_grad():
        f, y = ad.outputs((x, t, e))
        want = unet(x, t).sample
        torch.testing.assert_close(f, want.reshape(4, -1), rtol=0, atol=0)
        assert torch.equal(y, e.reshape(4, -1))
        torch.testing.assert_close(ad.loss((x, t, e)), 0.5 * ((want - e) ** 2).sum() / 4)
        torch.testing.assert_close(ad.loss((x, t, e), reduction="sum"), 0.5 * ((want - e) ** 2).sum())
        with pytest.raises(QBayesError, match="sampled"):
            ad.loss((x, t))
        s = ad.loss((x, t), "sampled", G().manual_seed(0))
        assert torch.isfinite(s) and torch.equal(s, ad.loss((x, t), "sampled", G().manual_seed(0)))
        # the block chain: the captured call arguments run the whole UNet to its prediction
        (args, kwargs), = ad.block_inputs([(x, t)])
        torch.testing.assert_close(ad.block_output(unet(*args, **kwargs)), want, rtol=0, atol=0)


def _calib(unet, n=4):
    from diffusers import DDPMScheduler

    S = schedule_of(DDPMScheduler(num_train_timesteps=100))
    return calibration_batches(eps_model_of(unet), S, n, (1, 8, 8), steps=5, seed=0, batch_size=8)


def _close(a, b, tol):
    return float((a - b).abs().max()) < tol * float(b.abs().max())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_weight_quantization_with_convolutions_through_the_adapter(unet, method):
    ad = adapter_for(unet)
    calib = _calib(unet) if method == "gptq" else None
    if calib is not None:
        assert sorted({int(v) for _, t in calib for v in t}) == [0, 20, 40, 60, 80]
    x, t = _batch(4, seed=3)
    with torch.no_grad():
        before = unet(x, t).sample
    selected = set(ad.layers())
    quantize_(unet, QuantSpec(8, -1), method, calib, convs=True, progress=False, float_dtype="float32")
    kinds = {n: type(m) for n, m in unet.named_modules() if n in selected}
    assert all(k in (QuantConv2d, QuantLinear) for k in kinds.values()) and QuantConv2d in kinds.values()
    assert isinstance(unet.time_embedding.linear_1, nn.Linear)  # excluded by default
    with torch.no_grad():
        after = unet(x, t).sample
    assert not torch.equal(after, before) and _close(after, before, 0.1)
    if method == "gptq":
        assert all(0 <= r["rel_error"] < 0.05 for r in unet.qbayes_config["layers"].values())


def test_activation_quantization_calibrated_on_ddim_trajectories(unet):
    calib = _calib(unet)
    x, t = _batch(4, seed=3)
    with torch.no_grad():
        before = unet(x, t).sample
    points = quantize_activations_(unet, ActSpec(8), calib, progress=False)
    layers = {n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(points) == layers - {"time_embedding.linear_1", "time_embedding.linear_2"}
    assert all(isinstance(q, ActQuant) for q in points.values())
    with torch.no_grad():
        after = unet(x, t).sample
    assert not torch.equal(after, before) and _close(after, before, 0.15)
