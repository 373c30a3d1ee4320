"""Issue 13, the float-model side: a model folder whose weights do not fit is refused (not
quantized with random tensors), before any work."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qbayes.cli import main
from qbayes.errors import QBayesError
from qbayes.models import load_causal_lm


def _edit_weights(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_float_model_with_a_missing_tensor_is_refused(model_dir, tmp_path, capsys):
    name = "model.layers.1.mlp.down_proj.weight"
    d = _edit_weights(model_dir, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(QBayesError, match=r"missing: .*down_proj\.weight"):
        load_causal_lm(str(d))
    rc = main(["quantize", "--model", str(d), "--no-eval", "--out", str(tmp_path / "q")])
    assert rc == 2 and "missing" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_float_model_with_an_unexpected_or_misshapen_tensor_is_refused(model_dir, tmp_path):
    d = _edit_weights(model_dir, tmp_path / "u", lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(QBayesError, match=r"unexpected: model\.extra\.weight"):
        load_causal_lm(str(d))
    name = "model.layers.0.self_attn.q_proj.weight"
    d = _edit_weights(model_dir, tmp_path / "s", lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(QBayesError, match="q_proj"):
        load_causal_lm(str(d))


def _quantize(model_dir, out, *extra):
    return main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "32", "--no-eval",
                 "--out", str(out), *extra])


def test_out_over_the_source_model_is_refused_before_any_work(model_dir, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for out in (d, d / "sub", tmp_path):
        assert _quantize(d, out) == 2
        assert "would overwrite the model it quantizes" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_bad_out_paths_are_refused_up_front(model_dir, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert _quantize(model_dir, f) == 2 and "existing file" in capsys.readouterr().err
    assert _quantize(model_dir, f / "below") == 2 and "which is a file" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    assert _quantize(model_dir, other) == 2 and "not a qbayes checkpoint" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_existing_checkpoint_needs_force(model_dir, tmp_path, capsys):
    from qbayes import load_quantized
    out = tmp_path / "q"
    assert _quantize(model_dir, out) == 0
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _quantize(model_dir, out, "--bits", "3") == 2 and "pass --force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first
    assert _quantize(model_dir, out, "--bits", "3", "--force") == 0
    assert load_quantized(out)[0].qbayes_config["layers"]["model.layers.0.mlp.up_proj"]["bits"] == 3


@pytest.mark.parametrize("args,message", [
    (["--damp", "-1"], "--damp"), (["--damp", "nan"], "--damp"), (["--batch-size", "0"], "--batch-size"),
    (["--threads", "0"], "--threads"), (["--threads", "-1"], "--threads"), (["--seqlen", "0"], "--seqlen"),
    (["--eval-windows", "0"], "--eval-windows"), (["--calib-samples", "0"], "--calib-samples"),
    (["--avg-bits", "inf"], "--avg-bits"),
])
def test_numeric_options_out_of_range_are_refused(model_dir, tmp_path, capsys, args, message):
    assert _quantize(model_dir, tmp_path / "q", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_generate_temperature_must_be_finite(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "hi", "--temperature", "nan"]) == 2
    assert "--temperature" in capsys.readouterr().err


def test_unreadable_text_files_are_clear_errors(model_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["quantize", "--model", str(model_dir), "--calib", str(bad), "--no-eval",
                 "--out", str(tmp_path / "q")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["quantize", "--model", str(model_dir), "--calib", str(tmp_path), "--no-eval",
                 "--out", str(tmp_path / "q")]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_folder_without_model_type_is_a_clear_error(model_dir, tmp_path, capsys):
    import json
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("model_type")
    (d / "config.json").write_text(json.dumps(cfg))
    assert _quantize(d, tmp_path / "q") == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and "Traceback" not in err


@pytest.mark.parametrize("damp", [-1.0, 0.0, float("nan"), float("inf")])
def test_invalid_damp_is_refused_not_replaced(damp, calib_ids):
    from qbayes import QuantSpec, quantize_

    from .conftest import tiny_llama
    with pytest.raises(QBayesError, match="damp must be a finite number > 0"):
        quantize_(tiny_llama(), QuantSpec(4, 32), "gptq", calib_ids, progress=False, damp=damp)


@pytest.mark.parametrize("batch_size", [0, -2])
def test_invalid_batch_size_is_refused(batch_size, calib_ids):
    from qbayes import QuantSpec, quantize_

    from .conftest import tiny_llama
    with pytest.raises(QBayesError, match="batch"):
        quantize_(tiny_llama(), QuantSpec(4, 32), "gptq", calib_ids, progress=False, batch_size=batch_size)


def test_a_full_disk_is_refused_before_quantizing(model_dir, tmp_path, capsys, monkeypatch):
    import collections
    import shutil as sh
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    assert _quantize(model_dir, tmp_path / "q") == 2
    err = capsys.readouterr().err
    assert "MB free" in err and "free some space" in err
    assert not (tmp_path / "q").exists()
