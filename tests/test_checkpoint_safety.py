"""Issue 13, the checkpoint side: what a hand-edited or forged checkpoint, a non-regular file, an
overwrite or a half-precision model used to get wrong, each checked against the original model."""
import json
import os
import signal
import stat

import pytest
import torch

import qbayes.io as qio
from qbayes import CheckpointError, QBayesError, QuantSpec, load_quantized, quantize_, save_quantized
from qbayes.nn import QuantLinear

from .conftest import tiny_llama

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(m):
    with torch.no_grad():
        return m(input_ids=IDS, use_cache=False).logits


@pytest.fixture
def saved(tmp_path):
    m = tiny_llama()
    quantize_(m, QuantSpec(4, 32), "rtn", progress=False)
    save_quantized(m, tmp_path / "ckpt")
    return tmp_path / "ckpt", _logits(m)


def _edit_meta(path, edit, rehash=True):
    meta = json.loads((path / qio.META).read_text())
    edit(meta)
    if rehash:  # a forger who also rewrites the metadata hash: the structural checks must still refuse
        meta["meta_sha256"] = qio.meta_digest(meta)
    (path / qio.META).write_text(json.dumps(meta))


@pytest.mark.parametrize("field,value", [("rope_theta", 1234.0), ("rms_norm_eps", 0.1), ("hidden_act", "gelu"),
                                         ("head_dim", 8), ("tie_word_embeddings", "flip")])
def test_hand_edited_config_is_refused(saved, field, value):
    path, _ = saved

    def edit(meta):
        cfg = meta["model_config"]
        cfg[field] = (not cfg.get(field)) if value == "flip" else value
    _edit_meta(path, edit, rehash=False)
    with pytest.raises(CheckpointError, match="edited"):
        load_quantized(path)


def test_forged_layer_scale_dtype_is_refused(saved):
    path, _ = saved
    _edit_meta(path, lambda m: m["layers"]["model.layers.0.mlp.up_proj"].__setitem__("scale_dtype", "float32"))
    with pytest.raises(CheckpointError, match="stored as F16, expected F32"):
        load_quantized(path)


@pytest.mark.parametrize("cls", ["AutoModel", "pipeline", "os", "LlamaConfig", "BertModel", "__class__"])
def test_model_class_comes_from_an_allow_list(saved, cls):
    path, _ = saved
    _edit_meta(path, lambda m: m.__setitem__("model_class", cls))
    with pytest.raises(CheckpointError, match="model class|not a transformers model class"):
        load_quantized(path)


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**6), ("hidden_size", 10**9),
                                         ("intermediate_size", 2**40), ("vocab_size", 10**8)])
def test_huge_sizes_are_refused_before_allocation(saved, field, value):
    path, _ = saved
    _edit_meta(path, lambda m: m["model_config"].__setitem__(field, value))
    signal.alarm(20)  # must not build a million layers or allocate terabytes
    try:
        with pytest.raises(CheckpointError):
            load_quantized(path)
    finally:
        signal.alarm(0)


def test_moderate_size_edit_is_caught_by_the_header_comparison(saved):
    path, _ = saved
    _edit_meta(path, lambda m: m["model_config"].__setitem__("intermediate_size", 256))
    with pytest.raises(CheckpointError, match="shape|recorded as 64->128"):
        load_quantized(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e10, 0.0, -1.0])
def test_forged_scales_are_refused(saved, value):
    """Forge the weights file too (both hashes rewritten): the values themselves are checked."""
    from safetensors.torch import load_file, save_file
    path, _ = saved
    t = load_file(str(path / qio.WEIGHTS))
    key = "model.layers.1.self_attn.q_proj.scales"
    t[key] = t[key].float().fill_(value).to(t[key].dtype)
    save_file(t, str(path / qio.WEIGHTS), metadata={"format": qio.FORMAT})
    _edit_meta(path, lambda m: m.__setitem__("sha256", qio._sha256(path / qio.WEIGHTS)))
    with pytest.raises(CheckpointError, match="scales|NaN"):
        load_quantized(path)


@pytest.mark.parametrize("target", [qio.WEIGHTS, qio.META, "tokenizer.json"])
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder", "dangling"])
def test_non_regular_files_are_refused_without_reading(saved, tmp_path, model_dir, target, kind):
    path, _ = saved
    from transformers import AutoTokenizer
    m, _ = load_quantized(path)
    save_quantized(m, path, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    f = path / target
    f.unlink()
    if kind == "fifo":
        os.mkfifo(f)
    elif kind == "dev_zero":
        f.symlink_to("/dev/zero")
    elif kind == "folder":
        f.mkdir()
    else:
        f.symlink_to(tmp_path / "nowhere")
    signal.alarm(20)  # opening a FIFO or reading /dev/zero would never return
    try:
        with pytest.raises(CheckpointError, match="regular file|missing"):
            load_quantized(path)
    finally:
        signal.alarm(0)


def test_oversized_header_is_refused_before_hashing(saved):
    path, _ = saved
    w = path / qio.WEIGHTS
    data = bytearray(w.read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bad header length"):
        load_quantized(path, verify=False)


def test_file_modes_follow_the_umask(saved):
    path, _ = saved
    old = os.umask(0o027)
    try:
        m, _ = load_quantized(path)
        save_quantized(m, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path / qio.WEIGHTS).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(path / qio.META).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o750


def test_save_refuses_a_folder_that_is_not_a_qbayes_checkpoint(saved, tmp_path):
    path, _ = saved
    m, _ = load_quantized(path)
    hf = tmp_path / "hf"
    tiny_llama().save_pretrained(hf)
    before = sorted(p.name for p in hf.iterdir())
    with pytest.raises(QBayesError, match="not a qbayes checkpoint"):
        save_quantized(m, hf)
    assert sorted(p.name for p in hf.iterdir()) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(QBayesError, match="other files"):
        save_quantized(m, other)
    (path / "my_notes.txt").write_text("mine")
    with pytest.raises(QBayesError, match="my_notes.txt"):
        save_quantized(m, path)
    (path / "my_notes.txt").unlink()
    (path / "model.onnx").write_bytes(b"an export")  # derived from the old checkpoint: replaced with it
    save_quantized(m, path)
    assert not (path / "model.onnx").exists()
    with pytest.raises(QBayesError, match="existing file"):
        save_quantized(m, path / qio.META)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_reload_in_their_dtype(tmp_path, calib_ids, dtype):
    m = tiny_llama().to(dtype)
    quantize_(m, QuantSpec(4, 32), "gptq", calib_ids, progress=False)
    save_quantized(m, tmp_path / "h")
    back, _ = load_quantized(tmp_path / "h")
    assert back.model.embed_tokens.weight.dtype == dtype and back.model.norm.weight.dtype == dtype
    assert torch.equal(_logits(back), _logits(m))


def test_tiny_weights_are_not_flushed_to_zero(tmp_path, calib_ids, caplog):
    m = tiny_llama()
    lin = m.model.layers[0].mlp.up_proj
    with torch.no_grad():
        lin.weight.mul_(1e-5)  # |w| ~ 1e-7: group scales far below float16's smallest normal
    w = lin.weight.detach().clone()
    quantize_(m, QuantSpec(4, 32), "rtn", progress=False)
    q = m.model.layers[0].mlp.up_proj
    assert isinstance(q, QuantLinear) and q.scales.dtype == torch.float32
    assert "float32 scales" in caplog.text
    rel = float((q.dequantize() - w).norm() / w.norm())
    assert rel < 0.2  # 4-bit rounding error, not a layer of zeros (rel = 1)
    assert q.spec.scale_dtype == "float32" and m.model.layers[0].mlp.down_proj.scales.dtype == torch.float16
    save_quantized(m, tmp_path / "t")
    back, _ = load_quantized(tmp_path / "t")
    assert torch.equal(_logits(back), _logits(m))


def test_per_tensor_groups_work_with_gptq(tmp_path, calib_ids):
    m = tiny_llama()
    quantize_(m, QuantSpec(4, 0), "gptq", calib_ids, progress=False)
    q = m.model.layers[0].self_attn
    assert q.q_proj.scales.unique().numel() == 1 and q.k_proj.scales.unique().numel() == 1
    assert not torch.equal(q.q_proj.scales, q.k_proj.scales)  # one scale per layer, not one for q/k/v stacked
    save_quantized(m, tmp_path / "p")
    assert torch.equal(_logits(load_quantized(tmp_path / "p")[0]), _logits(m))


def test_without_an_atomic_exchange_a_killed_swap_is_repaired(saved, monkeypatch):
    """Where renameat2 is missing the swap takes two renames; a save killed between them leaves the
    old checkpoint set aside, and the next load puts it back."""
    import qbayes.io.files as files
    path, ref = saved
    m, _ = load_quantized(path)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    save_quantized(m, path)  # the fallback path works
    assert torch.equal(_logits(load_quantized(path)[0]), ref)
    dead = 2**22 + 12345  # a pid that does not run
    aside = path.parent / f".{path.name}{files.PARTIAL}{dead}-abcd-old"
    path.rename(aside)  # the state right after the first rename
    assert torch.equal(_logits(load_quantized(path)[0]), ref)
    assert not aside.exists()


def test_saving_over_a_link_to_a_checkpoint_keeps_the_target(saved, tmp_path):
    path, ref = saved
    link = tmp_path / "link"
    link.symlink_to(path, target_is_directory=True)
    m = tiny_llama(seed=3)
    quantize_(m, QuantSpec(4, 32), "rtn", progress=False)
    save_quantized(m, link)
    assert not link.is_symlink() and torch.equal(_logits(load_quantized(link)[0]), _logits(m))
    assert torch.equal(_logits(load_quantized(path)[0]), ref)  # the old target is untouched
    assert not [p for p in tmp_path.iterdir() if ".qbayes-partial-" in p.name]
