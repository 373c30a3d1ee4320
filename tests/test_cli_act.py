"""``qbayes quantize`` with activations: the shipped CIFAR-10 CNN through the command line equals the
same recipe through the Python API (reloaded from the saved folder), an LM gets SmoothQuant and
static ranges, and options that do not fit the model are clear errors."""
import re

import torch

from qbayes.nn.act_quant import ActQuant
from qbayes import ActSpec, QuantSpec, load_quantized, quantize_, quantize_activations_
from qbayes.cli import main
from qbayes.data import load_cifar10_test
from qbayes.models.vision import load_vision

ARGS = ["--seqlen", "32", "--eval-windows", "3", "--threads", "2"]


def test_cifar_cnn_cli_equals_the_api(tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(["quantize", "--model", "cifar10-cnn", "--bits", "8", "--method", "rtn", "--act-bits", "8",
               "--no-eval", "--out", str(out), "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    assert "per-channel" in capsys.readouterr().out
    loaded, _ = load_quantized(out, model=load_vision("cifar10-cnn"))
    calib, _ = load_cifar10_test("calib")
    ref = load_vision("cifar10-cnn")
    quantize_activations_(ref, ActSpec(8), calib, exclude=("*embed*",), batch_size=100, progress=False)
    quantize_(ref, QuantSpec(8, -1, symmetric=True, clip="mse", scale_dtype="float32"), "rtn", convs=True,
              exclude=("*embed*",), float_dtype="float32", progress=False)
    x = load_cifar10_test("eval")[0][:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))


def test_lm_with_smoothquant_and_static_activations(model_dir, tmp_path, capsys):
    out = tmp_path / "lm"
    rc = main(["quantize", "--model", str(model_dir), "--bits", "8", "--group-size", "per-channel", "--method", "rtn",
               "--act-bits", "8", "--transforms", "smoothquant", "--calib-samples", "4", "--out", str(out), *ARGS])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    fp32 = float(re.search(r"\| fp32 \|[^|]*\|[^|]*\| ([0-9.]+) \|", text).group(1))
    q = float(re.search(r"\| rtn A8 per-tensor \+smoothquant \|[^|]*\|[^|]*\| ([0-9.]+) \|", text).group(1))
    assert 0 < q < 1.5 * fp32
    loaded, _ = load_quantized(out)
    assert any(hasattr(m, "input_quant") and m.input_quant.smooth is not None for m in loaded.modules())


def test_options_that_do_not_fit_are_errors(model_dir, tmp_path, capsys):
    assert main(["quantize", "--model", "minilm", "--transforms", "cle", "--act-bits", "8",
                 "--out", str(tmp_path / "m")]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert main(["quantize", "--model", str(model_dir), "--act-granularity", "per-token",
                 "--out", str(tmp_path / "n"), *ARGS]) == 2
    assert "give --act-bits" in capsys.readouterr().err
    assert main(["quantize", "--model", "fmnist-vit", "--transforms", "smoothquant", "--out", str(tmp_path / "v")]) == 2
    assert "give --act-bits" in capsys.readouterr().err


def test_lm_attention_matmuls_through_the_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "att"
    rc = main(["quantize", "--model", str(model_dir), "--bits", "8", "--group-size", "per-channel", "--method", "rtn",
               "--act-bits", "8", "--attn-bits", "6", "--softmax-format", "logsqrt2", "--calib-samples", "4",
               "--out", str(out), "--no-eval", *ARGS])
    assert rc == 0, capsys.readouterr().err
    loaded, _ = load_quantized(out)
    specs = {n.rsplit(".", 1)[-1]: m.spec for n, m in loaded.named_modules() if isinstance(m, ActQuant)}
    assert specs["q_point"] == ActSpec(6) and specs["probs_point"] == ActSpec(6, format="logsqrt2")
    assert specs["input_quant"] == ActSpec(8)


def test_attention_options_that_do_not_fit_are_errors(model_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(model_dir), "--attn-bits", "8", "--out", str(tmp_path / "a"), *ARGS]) == 2
    assert "give --act-bits too" in capsys.readouterr().err
    assert main(["quantize", "--model", "cifar10-cnn", "--act-bits", "8", "--attn-bits", "8",
                 "--out", str(tmp_path / "b")]) == 2
    assert "has no attention" in capsys.readouterr().err
    assert main(["quantize", "--model", "fmnist-vit", "--act-bits", "8", "--softmax-format", "log2", "--attn-bits",
                 "4", "--out", str(tmp_path / "c"), "--no-eval"]) == 0
