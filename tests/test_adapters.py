"""The model-adapter contract, on a tiny instance of every adapter: structure, batches, the
block-by-block run, the likelihood, the collector through it, and quantization through it.
A new adapter is one file plus one entry in CASES."""
import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, BertModel, ViTConfig,
                          ViTForImageClassification)

from qbayes import QuantSpec, quantize_
from qbayes.curvature import collect
from qbayes.errors import CalibrationError, QBayesError
from qbayes.models import DecoderAdapter, EncoderAdapter, ModuleAdapter, UNetAdapter, adapter_for, fashion_cnn
from qbayes.nn import QuantLinear

from .conftest import VOCAB, tiny_llama, tiny_opt

G = torch.Generator


def _bert_cfg(**kw):
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **kw)


def bert():
    torch.manual_seed(0)
    return BertModel(_bert_cfg()).eval()


def bert_classifier():
    torch.manual_seed(0)
    return BertForSequenceClassification(_bert_cfg(num_labels=3)).eval()


def vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                               num_labels=4)).eval()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))


def unet():
    pytest.importorskip("diffusers")
    from .test_diffusion_sampling import tiny_unet

    return tiny_unet()


def _ids(n=6, t=10, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=G().manual_seed(seed))


def _text(labels=False):
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    d = {"input_ids": _ids(), "attention_mask": mask}
    if labels:
        d["labels"] = torch.randint(0, 3, (6,), generator=G().manual_seed(2))
    return d


def _lm_ref(model, b):
    lg = model(input_ids=b).logits
    return lg[:, :-1].reshape(-1, lg.shape[-1]), b[:, 1:].reshape(-1)


# name: (model factory, adapter options, data, expected adapter, likelihood, reference (f, y) of one batch)
CASES = {
    "llama": (tiny_llama, {}, _ids(), DecoderAdapter, "classification", _lm_ref),
    "opt": (tiny_opt, {}, _ids(), DecoderAdapter, "classification", _lm_ref),
    "bert": (bert, {}, _text(), EncoderAdapter, "regression",
             lambda m, b: (m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[
                 b["attention_mask"].bool()], None)),
    "bert-classifier": (bert_classifier, {}, _text(labels=True), EncoderAdapter, "classification",
                        lambda m, b: (m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                      b["labels"])),
    "vit": (vit, {}, {"pixel_values": torch.randn(6, 3, 16, 16, generator=G().manual_seed(3)),
                      "labels": torch.randint(0, 4, (6,), generator=G().manual_seed(4))},
            EncoderAdapter, "classification", lambda m, b: (m(pixel_values=b["pixel_values"]).logits, b["labels"])),
    "cnn": (fashion_cnn, {}, [(torch.randn(3, 1, 28, 28, generator=G().manual_seed(5)), torch.tensor([1, 0, 9])),
                              (torch.randn(3, 1, 28, 28, generator=G().manual_seed(6)), torch.tensor([2, 2, 3]))],
            ModuleAdapter, "classification", lambda m, b: (m(b[0]), b[1])),
    "mlp-regression": (mlp, {"likelihood": "regression"},
                       torch.randn(6, 5, generator=G().manual_seed(7)), ModuleAdapter, "regression",
                       lambda m, b: (m(b), None)),
    "unet": (unet, {}, (torch.randn(6, 1, 8, 8, generator=G().manual_seed(8)), torch.tensor([0, 3, 17, 250, 600, 999])),
             UNetAdapter, "regression", lambda m, b: (m(b[0], b[1]).sample, None)),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    make, opts, data, cls, likelihood, ref = CASES[request.param]
    torch.manual_seed(0)
    model = make().eval()
    return request.param, model, adapter_for(model, **opts), data, cls, likelihood, ref


def test_structure(case):
    name, model, ad, data, cls, likelihood, _ = case
    assert type(ad) is cls and ad.likelihood == likelihood and ad.model is model
    blocks = ad.blocks()
    assert blocks and all((model.get_submodule(b) if b else model) is m for b, m in blocks)
    layers = ad.layers()
    assert layers and all(isinstance(m, (nn.Linear, nn.Conv2d)) and model.get_submodule(n) is m
                          for n, m in layers.items())
    for n in layers:  # every quantizable layer lies in exactly one block
        assert sum(1 for b, _ in blocks if not b or n.startswith(b + ".")) == 1
    in_blocks = {f"{b}.{n}" if b else n for b, m in blocks for n, x in m.named_modules()
                 if n and isinstance(x, (nn.Linear, nn.Conv2d))}
    assert set(ad.layers(exclude=[])) == in_blocks
    assert ad.layers(exclude=["*"]) == {}
    if name == "cnn":
        assert any(isinstance(m, nn.Conv2d) for m in layers.values())


def test_batches_forward_and_block_chain(case):
    name, model, ad, data, *_ = case
    batches = ad.batches(data, batch_size=4) if not isinstance(data, list) else ad.batches(data)
    assert sum(ad.rows(b) for b in batches) == 6
    last_name, last = ad.blocks()[-1]
    seen = []
    h = last.register_forward_hook(lambda m, a, out: seen.append(ad.block_output(out)))
    with torch.no_grad():
        for b in batches:
            ad.forward(b)
    h.remove()
    # running the blocks one after another from the captured inputs gives what the model computes
    with torch.no_grad():
        inputs = ad.block_inputs(batches)
        for _, block in ad.blocks():
            inputs = [ad.next_inputs(a, k, ad.block_output(block(*a, **k))) for a, k in inputs]
    for (a, k), want in zip(inputs, seen):
        got = a[0] if a else k["hidden_states"]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_likelihood_and_loss(case):
    name, model, ad, data, _, likelihood, ref = case
    b = ad.batches(data, batch_size=3)[0] if not isinstance(data, list) else ad.batches(data)[0]
    with torch.no_grad():
        f, y = ad.outputs(b)
        rf, ry = ref(model, b)
    torch.testing.assert_close(f, rf.reshape(f.shape), rtol=0, atol=0)
    assert (y is None) == (ry is None)
    if y is not None:
        assert torch.equal(y, ry)
        want = nn.functional.cross_entropy(rf, ry) if likelihood == "classification" else None
        torch.testing.assert_close(ad.loss(b), want)
    else:
        with pytest.raises(QBayesError, match="sampled"):
            ad.loss(b)
    s1 = ad.loss(b, "sampled", G().manual_seed(0))
    assert torch.isfinite(s1) and torch.equal(s1, ad.loss(b, "sampled", G().manual_seed(0)))


def test_collect_through_the_adapter_equals_hooked_second_moment(case):
    name, model, ad, data, *_ = case
    batches = ad.batches(data, batch_size=4) if not isinstance(data, list) else ad.batches(data)
    lname, layer = next((n, m) for n, m in ad.layers().items() if isinstance(m, nn.Linear))
    xs = []
    h = layer.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for b in batches:
            ad.forward(b)
    h.remove()
    X = torch.cat(xs)
    H = collect(ad, {lname: layer}, batches, want=("H", "ranges"), dtype=torch.float64)[lname]
    torch.testing.assert_close(H.H, 2 * X.T @ X / len(X))
    assert H.n_inputs == len(X) and torch.equal(H.xmin, X.amin(0)) and torch.equal(H.xmax, X.amax(0))


def test_gptq_through_the_adapter(case):
    name, model, ad, data, *_ = case
    calib = data if not isinstance(data, (list, torch.Tensor)) or name not in ("cnn",) else data
    with torch.no_grad():
        b = ad.batches(data, batch_size=6)[0] if not isinstance(data, list) else ad.batches(data)[0]
        before, _ = ad.outputs(b)
    quantize_(model, QuantSpec(8, -1), "gptq", calib, batch_size=3, progress=False, float_dtype="float32")
    qls = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert set(qls) == set(ad.layers(kinds=(nn.Linear, QuantLinear)))
    with torch.no_grad():
        after, _ = ad.outputs(b)
    assert not torch.equal(after, before)
    assert (after - before).abs().max() < 0.05 * before.abs().max() + 1e-3  # 8 bits: a small change


def test_bad_batches_are_named():
    with pytest.raises(CalibrationError, match="integer token ids"):
        adapter_for(tiny_llama()).batches(torch.zeros(2, 8))
    with pytest.raises(CalibrationError, match="input_ids"):
        adapter_for(bert()).batches({"pixel_values": torch.zeros(2, 3, 4, 4)})
    with pytest.raises(CalibrationError, match="pixel_values"):
        adapter_for(vit()).batches(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(CalibrationError, match="empty"):
        adapter_for(mlp()).batches([])
    with pytest.raises(QBayesError, match="likelihood"):
        adapter_for(mlp(), likelihood="poisson")
