"""The lean Llama decoder against the model's own (Hugging Face) forward."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbayes import QuantSpec, quantize_
from qbayes.errors import QBayesError
from qbayes.fastdecode import LlamaDecoder
from qbayes.generate import generate
from qbayes.kernels import cpu as cpu_kernel

from .conftest import VOCAB, tiny_llama, tiny_opt


def _hf_last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0, -1].double()


def _close(a, b, tol=1e-5):
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


@pytest.mark.parametrize("cpu_ops", [False, True], ids=["torch-ops", "fused-cpu-ops"])
@pytest.mark.parametrize("quantized", [False, "int", "nf4"])
def test_prefill_steps_and_chunks_match_the_model(quantized, cpu_ops, calib_ids):
    model = tiny_llama(seed=3)
    if quantized:
        quantize_(model, QuantSpec(bits=4, group_size=32, format=quantized), "gptq", calib_ids, progress=False)
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(5))
    dec = LlamaDecoder(model, max_len=32, use_cpu_ops=cpu_ops)
    assert (dec.ops is not None) == (cpu_ops and cpu_kernel.available())
    assert _close(dec.prefill(ids[:12]), _hf_last_logits(model, ids[:12]))
    for t in range(12, 16):  # single-token steps against the full forward over the whole prefix
        assert _close(dec.step(int(ids[t])), _hf_last_logits(model, ids[:t + 1]))
    # a multi-token chunk after cached tokens (explicit causal mask)
    assert _close(dec._forward(ids[16:20]), _hf_last_logits(model, ids[:20]))
    with pytest.raises(QBayesError, match="cache holds 32"):
        dec._forward(torch.zeros(13, dtype=torch.long))
    # prefill resets the cache
    assert _close(dec.prefill(ids[:5]), _hf_last_logits(model, ids[:5]))


def test_fused_projections_hold_the_same_packed_bytes(calib_ids):
    model = tiny_llama(seed=1)
    quantize_(model, QuantSpec(bits=4, group_size=32), "rtn", progress=False)
    dec = LlamaDecoder(model, max_len=8)
    a = model.model.layers[0].self_attn
    qkv = dec.layers[0][2]
    assert torch.equal(qkv.qweight, torch.cat([a.q_proj.qweight, a.k_proj.qweight, a.v_proj.qweight]))
    x = torch.randn(3, 64)
    assert torch.allclose(qkv(x), torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1), atol=1e-6)


def test_mixed_bit_widths_fall_back_to_separate_layers(calib_ids):
    model = tiny_llama(seed=2)
    quantize_(model, lambda name: QuantSpec(bits=8 if name.endswith("k_proj") else 4, group_size=32), "rtn",
              progress=False)
    dec = LlamaDecoder(model, max_len=16)
    ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(0))
    assert type(dec.layers[0][2]).__name__ == "_Split"
    assert _close(dec.prefill(ids), _hf_last_logits(model, ids))


def test_generate_engines_agree_and_unsupported_models_fall_back():
    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    model = tiny_llama(seed=4)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    a = generate(model, Tok(), prompt, 12, engine="qbayes")
    b = generate(model, Tok(), prompt, 12, engine="hf")
    assert a.text == b.text and a.new_tokens == 12 and a.engine == "qbayes" and b.engine == "hf"
    opt = tiny_opt()
    assert not LlamaDecoder.supports(opt)
    with pytest.raises(QBayesError, match="model type 'opt'"):
        LlamaDecoder(opt, 8)
    assert generate(opt, Tok(), prompt, 3).engine == "hf"  # auto falls back
    with pytest.raises(QBayesError, match="does not support"):
        generate(opt, Tok(), prompt, 3, engine="qbayes")


@pytest.mark.parametrize("cpu_ops", [False, True])
def test_untied_head_mha_and_biases(cpu_ops):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=False,
                      attention_bias=True, rope_theta=500.0, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(2))
    dec = LlamaDecoder(model, max_len=10, use_cpu_ops=cpu_ops)
    assert _close(dec.prefill(ids[:8]), _hf_last_logits(model, ids[:8]))
    assert _close(dec.step(int(ids[8])), _hf_last_logits(model, ids))


def test_fused_cpu_ops_against_torch():
    ops = cpu_kernel.decode_ops()
    if ops is None:
        pytest.skip("no C++ compiler here")
    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g), torch.randn(40, generator=g)
    ref = torch.nn.functional.rms_norm(x.double(), (40,), w.double(), 1e-6)
    assert torch.allclose(ops.rmsnorm(x, w, 1e-6).double(), ref, atol=1e-5)
    x2 = x.clone()
    y = ops.add_rmsnorm_(x2, r, w, 1e-6)
    assert torch.equal(x2, x + r)
    assert torch.allclose(y.double(), torch.nn.functional.rms_norm((x + r).double(), (40,), w.double(), 1e-6), atol=1e-5)
    H, KVH, D, L, n = 6, 2, 8, 12, 7
    kc, vc = torch.randn(KVH, L, D, generator=g), torch.randn(KVH, L, D, generator=g)
    q = torch.randn(1, (H + 2 * KVH) * D, generator=g)
    o = ops.attn_decode(q, kc, vc, n, 0.3, H, KVH)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :H * D].view(1, H, 1, D).double(), kc[None, :, :n].double(), vc[None, :, :n].double(), scale=0.3,
        enable_gqa=True)
    assert torch.allclose(o.double().view(H, D), ref.view(H, D), atol=1e-5)
    with pytest.raises(RuntimeError, match="n: 1..cache length"):
        ops.attn_decode(q, kc, vc, L + 1, 0.3, H, KVH)
    with pytest.raises(RuntimeError, match="float32"):
        ops.rmsnorm(x.double(), w, 1e-6)


def test_large_float_layers_are_not_copied(monkeypatch):
    import qbayes.fastdecode as fd

    monkeypatch.setattr(fd, "FUSE_FLOAT_MAX_BYTES", 0)
    model = tiny_llama(seed=6)
    dec = LlamaDecoder(model, max_len=12, use_cpu_ops=False)
    assert type(dec.layers[0][2]).__name__ == "_Split"  # no fused copy of the float weights
    ids = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(4))
    assert _close(dec.prefill(ids), _hf_last_logits(model, ids))


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_layouts(arch):
    """Qwen2 (q/k/v biases) and Mistral (no sliding window) run through the same decoder."""
    import transformers

    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, use_cache=False)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw, use_sliding_window=False)).eval()
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw, sliding_window=None)).eval()
    assert LlamaDecoder.supports(model)
    ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(3))
    for cpu_ops in (False, True):
        dec = LlamaDecoder(model, max_len=10, use_cpu_ops=cpu_ops)
        assert _close(dec.prefill(ids[:8]), _hf_last_logits(model, ids[:8]))
        assert _close(dec.step(int(ids[8])), _hf_last_logits(model, ids))
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(**kw, sliding_window=4)).eval()
    assert not LlamaDecoder.supports(windowed)
