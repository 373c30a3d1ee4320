"""Quantization points inside Hugging Face attention (qbayes.models.hf_attention): with the
points as identities the model computes what transformers' own attention computes (BERT with a
padding mask, ViT, a grouped-query Llama); the points really carry the matmul operands; the
activation quantizers placed there change the function as quantization should; checkpoints
rebuild them."""
import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification

from .conftest import VOCAB, tiny_llama
from qbayes import ActSpec, QuantSpec, load_quantized, quantize_, quantize_activations_, save_quantized
from qbayes.errors import QBayesError
from qbayes.models.hf_attention import IMPLEMENTATION, POINTS, add_attention_points, attention_modules
from qbayes.nn.act_quant import ActQuant


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128)).eval()


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                               num_labels=3)).eval()


def _text(n=4, t=12):
    ids = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 7:] = 0  # padded sentence: its keys must stay masked
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, batch):
    with torch.no_grad():
        o = model(**batch)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


CASES = {
    "bert": (tiny_bert, lambda: _text()),
    "vit": (tiny_vit, lambda: {"pixel_values": torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))}),
    "llama-gqa": (tiny_llama, lambda: _text()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_points_leave_the_model_unchanged(case):
    make, batch = CASES[case]
    model, b = make(), batch()
    ref = _out(copy.deepcopy(model), b)  # transformers' own (sdpa) attention
    names = add_attention_points(model)
    assert model.config._attn_implementation == IMPLEMENTATION
    assert len(names) == 4 * len(attention_modules(model)) == 4 * model.config.num_hidden_layers
    got = _out(model, b)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    assert add_attention_points(model) == names  # idempotent


def test_points_carry_the_operands_of_both_matmuls():
    model, b = tiny_bert(), _text()
    add_attention_points(model)
    seen = {}
    attn = model.get_submodule(attention_modules(model)[0])
    for p in POINTS:
        getattr(attn, p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, o))
    _out(model, b)
    heads, d = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    assert seen["q_point"].shape == seen["k_point"].shape == seen["v_point"].shape == (4, heads, 12, d)
    probs = seen["probs_point"]
    assert torch.allclose(probs.sum(-1), torch.ones(4, heads, 12), atol=1e-6)
    assert float(probs[1, :, :, 7:].abs().max()) == 0.0  # the padded keys get no weight
    # scores are (s Q) Kᵀ: the softmax of the captured operands reproduces the captured probabilities
    scores = seen["q_point"] @ seen["k_point"].transpose(-2, -1)
    assert torch.allclose(torch.softmax(scores[0], -1), probs[0], atol=1e-6)


def test_quantizers_at_the_points_quantize_bert_attention():
    calib = {"input_ids": _text(8)["input_ids"]}  # unpadded calibration sentences
    ref = _out(tiny_bert(), _text())
    errs = {}
    for bits in (8, 3):
        model = tiny_bert()
        pts = quantize_activations_(model, ActSpec(8, "per-token", dynamic=True), calib, matmuls=ActSpec(bits),
                                    softmax=ActSpec(bits), progress=False)
        at = [n for n in pts if n.rsplit(".", 1)[-1] in POINTS]
        assert len(at) == 8 and all(isinstance(pts[n], ActQuant) and pts[n].calibrated for n in at)
        seen = {}
        for n in at:
            pts[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
        got = _out(model, _text())
        # every matmul operand is on its quantizer's grid: at most 2^bits distinct values per tensor
        assert all(seen[n].unique().numel() <= 2 ** bits for n in at)
        errs[bits] = float((got - ref).norm() / ref.norm())
    assert errs[8] < 0.02 and errs[8] < errs[3]


def test_a_model_without_attention_refuses_matmul_points():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(QBayesError, match="no attention matmuls"):
        quantize_activations_(mlp, ActSpec(8), [torch.randn(16, 8)], matmuls=ActSpec(8), progress=False)


def test_bert_attention_points_reload_bit_for_bit(tmp_path):
    model, calib = tiny_bert(), _text(8)
    quantize_activations_(model, ActSpec(8), calib, matmuls=ActSpec(8), softmax=ActSpec(4, format="logsqrt2"),
                          progress=False)
    quantize_(model, QuantSpec(bits=4, group_size=32), "gptq", calib, progress=False)
    ref = _out(model, _text())
    save_quantized(model, tmp_path / "b")
    loaded, _ = load_quantized(tmp_path / "b")
    assert loaded.config._attn_implementation == IMPLEMENTATION
    kinds = {n.rsplit(".", 1)[-1]: m.spec.format for n, m in loaded.named_modules() if isinstance(m, ActQuant)}
    assert kinds["probs_point"] == "logsqrt2" and kinds["q_point"] == "int"
    assert torch.equal(_out(loaded, _text()), ref)
