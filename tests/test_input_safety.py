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
