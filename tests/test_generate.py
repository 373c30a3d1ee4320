"""Token generation: our cached decode loop against transformers' own greedy generate."""
import pytest
import torch
from transformers import AutoTokenizer

from qbayes import QuantSpec, load_quantized, quantize_, save_quantized
from qbayes.errors import QBayesError
from qbayes.generate import generate

from .conftest import tiny_llama


def test_greedy_matches_transformers_and_survives_quantization(model_dir, tmp_path, calib_ids):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = tiny_llama()
    prompt = "the company said it"
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)[0, ids.shape[1]:]
    g = generate(model, tok, prompt, 12, stop_at_eos=False)
    assert tok.decode(ref.tolist(), skip_special_tokens=True) == g.text
    assert g.new_tokens == 12 and g.prompt_tokens == ids.shape[1] and g.tokens_per_s > 0
    quantize_(model, QuantSpec(bits=4, group_size=32), method="gptq", calib=calib_ids, progress=False)
    save_quantized(model, tmp_path / "q", tokenizer=tok)
    again, tok2 = load_quantized(tmp_path / "q")
    with torch.no_grad():
        ref_q = again.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)[0, ids.shape[1]:]
    assert generate(again, tok2, prompt, 12, stop_at_eos=False).text == tok.decode(ref_q.tolist(), skip_special_tokens=True)
    s1 = generate(again, tok2, prompt, 6, temperature=1.0, seed=3, stop_at_eos=False).text
    assert s1 == generate(again, tok2, prompt, 6, temperature=1.0, seed=3, stop_at_eos=False).text
    with pytest.raises(QBayesError):
        generate(again, tok2, prompt, 0)
    with pytest.raises(QBayesError):
        generate(again, tok2, "", 3)


def test_hf_decode_path_runs_without_autograd_and_never_dequantizes(model_dir, calib_ids, monkeypatch):
    """Regression: ``@torch.no_grad()`` sat on a helper, so the Hugging Face decode loop ran with
    autograd on, and every QuantLinear fell back to dequantizing its weight at every token."""
    from qbayes.kernels import cpu
    from qbayes.nn import QuantLinear

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = tiny_llama()
    quantize_(model, QuantSpec(bits=4, group_size=32), method="rtn", progress=False)
    calls = {"dequantize": 0, "grad_forwards": 0}
    real = QuantLinear.dequantize

    def counting(self, *a, **k):
        calls["dequantize"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(QuantLinear, "dequantize", counting)
    h = model.register_forward_pre_hook(lambda m, a: calls.__setitem__("grad_forwards", calls["grad_forwards"]
                                                                        + torch.is_grad_enabled()))
    g = generate(model, tok, "the company said it", 8, stop_at_eos=False, engine="hf")
    h.remove()
    assert g.new_tokens == 8
    assert calls["grad_forwards"] == 0
    if cpu.available():  # the packed kernel reads the codes directly: no dequantized weight per token
        assert calls["dequantize"] == 0
