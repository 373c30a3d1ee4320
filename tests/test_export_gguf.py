"""GGUF export: the file's tensors, read back and dequantized by the gguf package's own code,
are qbayes's weights; a float64 numpy Llama with ggml's interleaved rotary convention, run on
those tensors, reproduces qbayes's logits (so names, row permutation and metadata are right);
llama.cpp itself loads the file when llama-cpp-python is installed."""
import json

import numpy as np
import pytest
import torch

from qbayes import QuantSpec, quantize_
from qbayes.errors import QBayesError
from qbayes.nn import QuantLinear

from .conftest import tiny_llama, tiny_opt

gguf = pytest.importorskip("gguf")

from qbayes.export.gguf import export_gguf, gguf_name, rope_row_order


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte (what byte-level BPE vocabularies hold)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _write_tokenizer(folder, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json: two specials, the 256 byte tokens, then merged pairs."""
    byte_toks = _bytes_to_unicode()
    vocab = {t: i + 2 for i, t in enumerate(byte_toks)}
    merges = []
    for a, b in [("t", "h"), ("th", "e"), ("a", "n")]:
        if len(vocab) + 2 < vocab_size:
            vocab[a + b] = len(vocab) + 2
            merges.append([a, b])
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": merges},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}, "decoder": {"type": "ByteLevel"},
            "added_tokens": [{"id": 0, "content": "<s>", "special": True}, {"id": 1, "content": "</s>", "special": True}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def _llama(vocab=300, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, use_cache=False,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _export(tmp_path, spec, tie=True, **kw):
    model = _llama(tie=tie)
    quantize_(model, spec, method="rtn", progress=False)
    _write_tokenizer(tmp_path, model.config.vocab_size)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=tmp_path, **kw)
    return model, report, gguf.GGUFReader(str(tmp_path / "m.gguf"))


def _weights(reader) -> dict[str, np.ndarray]:
    """Every tensor of the file as float64 (rows, cols), dequantized by the gguf package."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        out[t.name] = a.reshape(*[int(d) for d in reversed(t.shape)]) if a.ndim > 1 else a.reshape(-1)
    return out


@pytest.mark.parametrize("spec,kind,exact", [
    (QuantSpec(bits=4, group_size=32, symmetric=True, clip="minmax"), "Q4_0", True),
    (QuantSpec(bits=4, group_size=32, symmetric=False, clip="minmax"), "Q4_1", True),
    (QuantSpec(bits=8, group_size=32, symmetric=True, clip="minmax"), "Q8_0", True),
    (QuantSpec(bits=3, group_size=32), "Q8_0", False),
    (QuantSpec(bits=4, group_size=64), "Q8_0", False),
    (QuantSpec(bits=4, group_size=32, format="nf4"), "Q8_0", False),  # not affine: no ggml block holds it as it is
])
def test_gguf_tensors_are_the_quantized_weights(tmp_path, spec, kind, exact):
    model, report, reader = _export(tmp_path, spec)
    w = _weights(reader)
    cfg = model.config
    assert reader.fields["llama.block_count"].contents() == cfg.num_hidden_layers
    assert reader.fields["llama.attention.head_count_kv"].contents() == cfg.num_key_value_heads
    assert reader.fields["general.architecture"].contents() == "llama"
    assert "output.weight" not in w  # tied: llama.cpp reuses token_embd
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qlayers) == 14
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for n, m in qlayers.items():
        g = gguf_name(n + ".weight")
        assert types[g] == kind
        got = w[g]
        if ".attn_q." in g or ".attn_k." in g:
            heads = cfg.num_attention_heads if ".attn_q." in g else cfg.num_key_value_heads
            got = got[np.argsort(rope_row_order(got.shape[0], heads))]
        ref = m.dequantize(torch.float64).numpy()
        if exact:
            assert g in report["exact"]
            tol = report["q4_1_max_abs_dw"] if kind == "Q4_1" else 0.0
            np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
        else:
            assert report["converted"][g][0] == "Q8_0"
            # requantizing onto an 8-bit grid: half a step of each block, plus the float16
            # rounding of the block scale (127 steps times 2^-11 relative)
            step = np.abs(ref).reshape(ref.shape[0], -1, 32).max(-1, keepdims=True) / 127
            err = np.abs(got - ref).reshape(ref.shape[0], -1, 32)
            assert (err <= (0.5 + 127 * 2.0**-11) * step + 1e-7).all()
    if kind == "Q4_1":  # m = -s z in float16: a small fraction of a quantization step
        steps = min(float(m.scales.float().min()) for m in qlayers.values())
        assert report["q4_1_max_abs_dw"] < 0.01 * steps * 16


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_interleaved(x, theta):
    """ggml/Meta rotary embedding: rotate the pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d)."""
    n, _, d = x.shape
    ang = np.arange(n)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def _numpy_llama(reader, ids):
    """Float64 forward of a GGUF Llama from its tensors and metadata alone."""
    f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("llama.")}
    w = _weights(reader)
    nh, nkv = f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    eps, theta, hd = f["llama.attention.layer_norm_rms_epsilon"], f["llama.rope.freq_base"], f["llama.rope.dimension_count"]
    x = w["token_embd.weight"][ids]
    n = len(ids)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(f["llama.block_count"]):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = _rope_interleaved((h @ w[p + "attn_q.weight"].T).reshape(n, nh, hd), theta)
        k = _rope_interleaved((h @ w[p + "attn_k.weight"].T).reshape(n, nkv, hd), theta)
        v = (h @ w[p + "attn_v.weight"].T).reshape(n, nkv, hd)
        heads = []
        for j in range(nh):
            kv = j // (nh // nkv)
            a = q[:, j] @ k[:, kv].T / np.sqrt(hd) + mask
            a = np.exp(a - a.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, -1) @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_runs_as_a_llama_with_interleaved_rope(tmp_path, tie):
    model, report, reader = _export(tmp_path, QuantSpec(bits=4, group_size=32, symmetric=True, clip="minmax"),
                                    tie=tie, float_type="f32")
    ids = torch.randint(0, model.config.vocab_size, (13,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids[None]).logits[0].double().numpy()
    got = _numpy_llama(reader, ids.numpy())
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert ("output.weight" in report["exact"] or "output.weight" in {t.name for t in reader.tensors}) == (not tie)


def test_gguf_tokenizer_metadata(tmp_path):
    _, report, reader = _export(tmp_path, QuantSpec(bits=4, group_size=32, symmetric=True))
    toks = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(toks) == 300 and toks[0] == "<s>" and toks[2 + ord("A")] == "A" and "the" in toks
    assert reader.fields["tokenizer.ggml.merges"].contents() == ["t h", "th e", "a n"]
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 1
    assert report["notes"]


def test_gguf_template_tokenizer_is_copied(tmp_path):
    _, _, _ = _export(tmp_path, QuantSpec(bits=4, group_size=32, symmetric=True))
    model = _llama()
    quantize_(model, QuantSpec(bits=8, group_size=32, symmetric=True), method="rtn", progress=False)
    report = export_gguf(model, tmp_path / "b.gguf", template=tmp_path / "m.gguf")
    a = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    b = gguf.GGUFReader(str(tmp_path / "b.gguf")).fields
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id"):
        assert a[k].contents() == b[k].contents()
    assert report["file_type"] == "Q8_0" and not report["notes"]


def test_gguf_refuses_what_it_cannot_write(tmp_path):
    m = tiny_opt()
    quantize_(m, QuantSpec(bits=4, group_size=32), method="rtn", progress=False)
    _write_tokenizer(tmp_path, 300)
    with pytest.raises(QBayesError, match="llama/mistral"):
        export_gguf(m, tmp_path / "x.gguf", tokenizer_dir=tmp_path)
    llama = tiny_llama()
    with pytest.raises(QBayesError, match="tokenizer"):
        export_gguf(llama, tmp_path / "x.gguf")
    with pytest.raises(QBayesError, match="float_type"):
        export_gguf(llama, tmp_path / "x.gguf", tokenizer_dir=tmp_path, float_type="q2")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(QBayesError, match="not a readable GGUF"):
        export_gguf(llama, tmp_path / "x.gguf", template=tmp_path / "bad.gguf")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(QBayesError, match="not valid JSON"):
        export_gguf(llama, tmp_path / "x.gguf", tokenizer_dir=tmp_path)
    assert not list(tmp_path.glob("x.gguf*"))  # no partial file left behind


def test_gguf_loads_in_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, _, _ = _export(tmp_path, QuantSpec(bits=4, group_size=32, symmetric=False, clip="minmax"), float_type="f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    ids = torch.randint(3, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(5))
    llm.eval(ids.tolist())
    got = np.asarray(llm.scores[:12], dtype=np.float64)
    with torch.no_grad():
        ref = model(input_ids=ids[None]).logits[0].double().numpy()
    # llama.cpp rounds activations to 8 bits inside its quantized dot products
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
