"""Every bad input gets a clear error naming the problem, and never a silently wrong model or a lost file."""
import json

import pytest
import torch

import qbayes.io as qio
from qbayes import CalibrationError, CheckpointError, QBayesError, QuantSpec, load_quantized, quantize_, save_quantized
from qbayes.nn import QuantLinear

from .conftest import tiny_llama


@pytest.fixture
def saved(tmp_path, calib_ids):
    m = tiny_llama()
    quantize_(m, QuantSpec(4, 32), "gptq", calib_ids, progress=False)
    save_quantized(m, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0])
def test_unsupported_bit_width(bits):
    with pytest.raises(QBayesError, match="bit-width"):
        QuantSpec(bits=bits)


def test_group_size_that_does_not_divide_names_valid_ones(calib_ids):
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(QBayesError, match=r"group size 48 does not divide the input dimension 64 .*valid group sizes are \[8, 16, 32, 64\]"):
        quantize_(m, QuantSpec(4, 48), "gptq", calib_ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched


def test_nan_or_inf_weights_refused_before_any_change(calib_ids):
    for bad in (float("nan"), float("inf")):
        m = tiny_llama()
        m.model.layers[1].mlp.up_proj.weight.data[3, 4] = bad
        with pytest.raises(QBayesError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds NaN/Inf"):
            quantize_(m, QuantSpec(4, 32), "gptq", calib_ids, progress=False)
        assert not any(isinstance(x, QuantLinear) for x in m.modules())


def test_unsupported_layer_named_explicitly(calib_ids):
    m = tiny_llama()
    with pytest.raises(QBayesError, match="Embedding.*only nn.Linear"):
        quantize_(m, QuantSpec(4, 32), "rtn", include=["model.embed_tokens"], progress=False)
    with pytest.raises(QBayesError, match="no module named"):
        quantize_(m, QuantSpec(4, 32), "rtn", include=["model.nope"], progress=False)


def test_unknown_method_and_option(calib_ids):
    with pytest.raises(QBayesError, match="unknown method 'foo'"):
        quantize_(tiny_llama(), QuantSpec(), "foo", calib_ids)
    with pytest.raises(QBayesError, match="takes no option"):
        quantize_(tiny_llama(), QuantSpec(4, 32), "rtn", calib_ids, act_order=True)


def test_unsupported_model_family():
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(QBayesError, match="Conv1D"):
        quantize_(m, QuantSpec(4, 32), "rtn")


@pytest.mark.parametrize("calib", [None, torch.zeros(0, 16, dtype=torch.long), [], torch.zeros(2, 8)])
def test_empty_or_missing_calibration(calib):
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CalibrationError):
        quantize_(m, QuantSpec(4, 32), "gptq", calib, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched


def test_corrupt_checkpoint_detected(saved):
    w = saved / qio.WEIGHTS
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(saved)


def test_truncated_checkpoint_detected(saved):
    w = saved / qio.WEIGHTS
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized(saved)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):  # even without the hash check
        load_quantized(saved, verify=False)


def test_foreign_checkpoints(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_quantized(tmp_path / "missing")
    hf = tmp_path / "hf"
    tiny_llama().save_pretrained(hf)  # a plain Hugging Face folder
    with pytest.raises(CheckpointError, match="not a qbayes checkpoint"):
        load_quantized(hf)
    (hf / "qbayes.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not qbayes metadata"):
        load_quantized(hf)
    (hf / "qbayes.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(hf)
    meta = json.loads((saved / "qbayes.json").read_text())
    meta["format_version"] = 99
    (saved / "qbayes.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_quantized(saved)


def test_checkpoint_with_swapped_tensor_shapes(saved, tmp_path):
    meta = json.loads((saved / "qbayes.json").read_text())
    name = "model.layers.0.mlp.down_proj"
    meta["layers"][name]["bits"] = 8  # metadata no longer fits the stored tensors
    (saved / "qbayes.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="edited"):  # the metadata hash
        load_quantized(saved)
    meta["meta_sha256"] = qio.meta_digest(meta)  # a forger who also rewrites the hash
    (saved / "qbayes.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        load_quantized(saved)


def test_failed_save_keeps_the_old_checkpoint(saved, calib_ids, monkeypatch):
    before = (saved / qio.WEIGHTS).read_bytes(), (saved / qio.META).read_text()
    m = tiny_llama(seed=5)
    quantize_(m, QuantSpec(2, 32), "rtn", progress=False)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(CheckpointError, match="disk full.*intact"):
        save_quantized(m, saved)
    assert (saved / qio.WEIGHTS).read_bytes() == before[0] and (saved / qio.META).read_text() == before[1]
    assert sorted(p.name for p in saved.iterdir() if p.name.endswith(".tmp")) == []
    assert not [p for p in saved.parent.iterdir() if ".qbayes-partial-" in p.name]
    load_quantized(saved)


def test_saving_an_unquantized_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not quantized"):
        save_quantized(tiny_llama(), tmp_path / "x")
