"""quantize -> save -> load -> identical logits, on tiny random Llama and OPT models."""
import json
import os

import pytest
import torch

from qbayes import QuantSpec, load_quantized, quantize_, save_quantized
from qbayes.formats import packed_length
from qbayes.io import WEIGHTS, checkpoint_bytes
from qbayes.nn import QuantLinear

from .conftest import DEVICE, VOCAB, tiny_llama


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method,spec,opts", [
    ("gptq", QuantSpec(4, 32), {"act_order": True}),
    ("gptq", QuantSpec(3, -1, symmetric=True), {}),
    ("gptq", QuantSpec(2, 16), {}),
    ("rtn", QuantSpec(8, 64, clip="minmax"), {}),
])
def test_quantize_save_load_identical_logits(tiny_model, calib_ids, tmp_path, method, spec, opts):
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref = logits(tiny_model, ids)
    quantize_(tiny_model, spec, method, calib_ids, batch_size=4, progress=False, **opts)
    q = logits(tiny_model, ids)
    assert not torch.equal(q, ref)  # it really changed
    assert (q - ref).abs().max() < 10 * ref.abs().max()
    save_quantized(tiny_model, tmp_path / "ckpt")
    loaded, tok = load_quantized(tmp_path / "ckpt", device=DEVICE)
    assert tok is None
    assert torch.equal(logits(loaded, ids), q)
    qls = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == (14 if "Llama" in type(loaded).__name__ else 12)
    for m in qls:  # real packed storage: b bits per code
        assert m.qweight.shape == (m.out_features, packed_length(m.in_features, spec.bits))


def test_float_params_stored_in_16_bit_and_checkpoint_small(calib_ids, tmp_path):
    m = tiny_llama()
    fp32_bytes = sum(p.numel() * 4 for p in m.parameters())
    quantize_(m, QuantSpec(4, 32), "gptq", calib_ids, progress=False)
    save_quantized(m, tmp_path / "c")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c" / WEIGHTS), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == torch.float16
    assert dtypes["model.norm.weight"] == torch.float16
    assert dtypes["model.layers.0.mlp.down_proj.qweight"] == torch.uint8
    assert "lm_head.weight" not in dtypes  # tied: stored once
    assert os.path.getsize(tmp_path / "c" / WEIGHTS) < 0.45 * fp32_bytes
    assert checkpoint_bytes(tmp_path / "c") > os.path.getsize(tmp_path / "c" / WEIGHTS)


def test_metadata_records_every_layer(calib_ids, tmp_path):
    m = tiny_llama()
    quantize_(m, QuantSpec(3, 16), "gptq", calib_ids, progress=False, damp=0.05)
    save_quantized(m, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "qbayes.json").read_text())
    assert meta["format_version"] == 2 and meta["method"] == "gptq" and meta["options"] == {"damp": 0.05}
    assert len(meta["layers"]) == 14
    for info in meta["layers"].values():
        assert info["bits"] == 3 and info["group_size"] == 16 and 0 <= info["rel_error"] < 1


def test_untied_model_roundtrip(calib_ids, tmp_path):
    m = tiny_llama(tie=False)
    ids = calib_ids[:2]
    quantize_(m, QuantSpec(4, 64), "rtn", progress=False)
    q = logits(m, ids)
    save_quantized(m, tmp_path / "c")
    loaded, _ = load_quantized(tmp_path / "c")
    assert torch.equal(logits(loaded, ids), q)


def test_packed_head_round_trip(tmp_path, calib_ids):
    """``head=`` packs the tied lm_head by RTN: logits follow the dequantized head exactly, the
    embedding lookup keeps the float table, and the checkpoint reloads bit-identically."""
    from qbayes.errors import QBayesError

    torch.set_num_threads(1)
    model = tiny_llama()
    emb = model.get_input_embeddings().weight.detach().clone()
    quantize_(model, QuantSpec(bits=4, group_size=32), method="gptq", calib=calib_ids, progress=False,
              head=QuantSpec(bits=8, group_size=32, symmetric=True), float_dtype="float32")
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.spec.bits == 8
    assert torch.equal(model.get_input_embeddings().weight, emb)  # untied: the lookup table is unchanged
    assert model.qbayes_config["layers"]["lm_head"]["solver"] == "rtn"
    ids = calib_ids[:2]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        ref = hidden @ model.lm_head.dequantize().T
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # 8-bit groups of 32 stay close to the float head
    err = (model.lm_head.dequantize() - emb).abs().max() / emb.abs().max()
    assert err < 1 / 127
    save_quantized(model, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, got)
    with pytest.raises(QBayesError, match="group size 48"):
        quantize_(tiny_llama(), QuantSpec(bits=4, group_size=32), method="rtn", head=QuantSpec(bits=8, group_size=48))


def test_plain_cnn_quantizes_saves_and_reloads_into_a_skeleton(tmp_path):
    """A model without a transformers config goes through the module adapter, and reloads into a
    float instance of its architecture passed as ``model=``."""
    from qbayes.errors import CheckpointError
    from qbayes.models import fashion_cnn

    torch.manual_seed(0)
    cnn = fashion_cnn().eval()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    quantize_(cnn, QuantSpec(4, 32), "gptq", x, batch_size=8, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in cnn.modules()) == 2
    with torch.no_grad():
        want = cnn(x)
    save_quantized(cnn, tmp_path / "cnn")
    with pytest.raises(CheckpointError, match="model="):
        load_quantized(tmp_path / "cnn")
    torch.manual_seed(5)
    loaded, _ = load_quantized(tmp_path / "cnn", model=fashion_cnn())
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
