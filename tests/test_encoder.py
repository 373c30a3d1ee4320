"""A text encoder through the adapter seam: sentence lines, unpadded calibration windows, mean-pooled
embeddings (against a float64 loop and against one-sentence-at-a-time runs), and a tiny BERT
quantized by RTN and GPTQ, saved and reloaded with identical embeddings. The real
all-MiniLM-L6-v2 run is bench/encoder.py (and the slow test at the end)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, BertModel, BertTokenizerFast

from qbayes import QuantSpec, load_quantized, quantize_, save_quantized
from qbayes.data import encoder_windows, sentence_lines
from qbayes.errors import CalibrationError, QBayesError
from qbayes.eval import cosine_to_reference, mean_pool, sentence_embeddings
from qbayes.nn import QuantLinear

WORDS = ("the cat sat on a mat while dogs ran past green hills under grey skies and birds sang "
         "softly near old stone walls").split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def tiny_bert(vocab: int) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    return BertModel(cfg).eval()


def _sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 20, (n,), generator=g).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist()) for k in lens]


def test_sentence_lines_keeps_long_non_heading_lines(tmp_path):
    p = tmp_path / "wiki.txt"
    p.write_text(" = Title = \n\n one two three four five six seven eight \n = = Section = = \n"
                 " too short here \n a b c d e f g h i j \n")
    assert sentence_lines(p) == ["one two three four five six seven eight", "a b c d e f g h i j"]
    assert sentence_lines(p, min_words=10) == ["a b c d e f g h i j"]
    with pytest.raises(CalibrationError, match="no line of at least 50 words"):
        sentence_lines(p, min_words=50)


def test_encoder_windows_frame_slices_of_the_text(tokenizer):
    ids = torch.arange(5, 5 + len(WORDS)).repeat(20)
    w = encoder_windows(ids, tokenizer, seqlen=16, n=7, seed=3)
    x = w["input_ids"]
    assert x.shape == (7, 16)
    assert (x[:, 0] == tokenizer.cls_token_id).all() and (x[:, -1] == tokenizer.sep_token_id).all()
    text = ids.tolist()
    for row in x[:, 1:-1].tolist():  # each body is a contiguous slice of the text
        assert any(text[o:o + 14] == row for o in range(len(text) - 13))
    assert (w["attention_mask"] == 1).all() and (w["token_type_ids"] == 0).all()


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 4), t=st.integers(1, 9), d=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_mean_pool_matches_a_float64_loop(b, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) < 0.6).long()
    mask[:, 0] = 1  # a tokenizer always keeps [CLS]
    got = mean_pool(h, mask)
    for i in range(b):
        keep = [h[i, j] for j in range(t) if mask[i, j]]
        want = sum(keep) / len(keep)
        assert torch.allclose(got[i], want, rtol=1e-12, atol=1e-12)


def test_cosine_to_reference_closed_form():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]])
    assert cosine_to_reference(a, b).tolist() == pytest.approx([0.0, 1.0, -1.0], abs=1e-12)
    with pytest.raises(QBayesError, match="different shapes"):
        cosine_to_reference(a, b[:2])


def test_batched_padded_embeddings_equal_one_sentence_at_a_time(tokenizer):
    model = tiny_bert(tokenizer.vocab_size)
    sents = _sentences(9)
    batched = sentence_embeddings(model, tokenizer, sents, batch_size=4)
    single = torch.cat([sentence_embeddings(model, tokenizer, [s], batch_size=1) for s in sents])
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(sents)), atol=1e-6)
    with pytest.raises(QBayesError, match="no sentences"):
        sentence_embeddings(model, tokenizer, [])


@pytest.mark.parametrize("method,bits,group", [("rtn", 8, -1), ("gptq", 4, 32), ("gptq", 8, -1)])
def test_tiny_bert_quantized_saved_and_reloaded(tokenizer, tmp_path, method, bits, group):
    fp32 = tiny_bert(tokenizer.vocab_size)
    sents = _sentences(24, seed=1)
    ref = sentence_embeddings(fp32, tokenizer, sents)
    ids = tokenizer(" ".join(_sentences(200, seed=2)), add_special_tokens=False, return_tensors="pt").input_ids[0]
    calib = encoder_windows(ids, tokenizer, seqlen=32, n=32)
    model = tiny_bert(tokenizer.vocab_size)
    quantize_(model, QuantSpec(bits=bits, group_size=group), method, calib, batch_size=8, progress=False)
    q = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(q) == 2 * 6 and all(".layer." in n for n in q)  # every block linear, not the pooler
    got = sentence_embeddings(model, tokenizer, sents)
    save_quantized(model, tmp_path / "ckpt", tokenizer=tokenizer)
    loaded, tok2 = load_quantized(tmp_path / "ckpt")
    assert torch.equal(sentence_embeddings(loaded, tok2, sents), got)
    cos = cosine_to_reference(ref, got)
    assert cos.min() > (0.999 if bits == 8 else 0.95), cos.min()


def test_gptq_beats_rtn_on_the_tiny_bert_embeddings(tokenizer):
    """At W3 the solver's advantage is large enough to see on a random tiny model."""
    ids = tokenizer(" ".join(_sentences(200, seed=2)), add_special_tokens=False, return_tensors="pt").input_ids[0]
    calib = encoder_windows(ids, tokenizer, seqlen=32, n=32)
    sents = _sentences(40, seed=4)
    ref = sentence_embeddings(tiny_bert(tokenizer.vocab_size), tokenizer, sents)
    err = {}
    for method in ("rtn", "gptq"):
        model = tiny_bert(tokenizer.vocab_size)
        quantize_(model, QuantSpec(bits=3, group_size=32), method, calib, batch_size=8, progress=False)
        err[method] = float(1 - cosine_to_reference(ref, sentence_embeddings(model, tokenizer, sents)).mean())
    assert err["gptq"] < err["rtn"], err


@pytest.mark.slow
def test_minilm_gptq_w4g32_keeps_embeddings():
    from qbayes.data import CALIB_TEXT, EVAL_TEXT, data_path, tokenize_file
    from qbayes.models import load_encoder, minilm_l6

    model, tok = load_encoder(str(minilm_l6()))
    sents = sentence_lines(data_path(EVAL_TEXT))[:200]
    ref = sentence_embeddings(model, tok, sents)
    calib = encoder_windows(tokenize_file(data_path(CALIB_TEXT), tok), tok, seqlen=128, n=64)
    quantize_(model, QuantSpec(bits=4, group_size=32), "gptq", calib, batch_size=16, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 36
    cos = cosine_to_reference(ref, sentence_embeddings(model, tok, sents))
    assert not math.isnan(float(cos.mean())) and cos.mean() > 0.985


def test_a_padded_calibration_batch_is_flagged_once(tokenizer, caplog):
    from qbayes.models import adapter_for

    adapter = adapter_for(tiny_bert(tokenizer.vocab_size))
    enc = tokenizer(_sentences(4), padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    with caplog.at_level("WARNING", logger="qbayes.models.hf_encoder"):
        adapter.batches(dict(enc), batch_size=2)
        adapter.batches(dict(enc), batch_size=2)
    assert sum("padded" in r.message for r in caplog.records) == 1
    caplog.clear()
    ids = tokenizer(" ".join(_sentences(50)), add_special_tokens=False, return_tensors="pt").input_ids[0]
    with caplog.at_level("WARNING", logger="qbayes.models.hf_encoder"):
        adapter_for(tiny_bert(tokenizer.vocab_size)).batches(encoder_windows(ids, tokenizer, 16, 4))
    assert not caplog.records
