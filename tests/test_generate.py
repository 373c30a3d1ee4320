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
