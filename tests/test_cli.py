"""The command line on a tiny model folder with its own small tokenizer."""
import argparse
import re

import pytest
import torch

from qbayes.cli import main

ARGS = ["--seqlen", "32", "--eval-windows", "3", "--threads", "2"]


def _ppl(text, method):
    m = re.search(rf"\| {method} \|[^|]*\|[^|]*\| ([0-9.]+) \|", text)
    assert m, text
    return float(m.group(1))


def test_quantize_then_eval_reports_the_same_perplexity(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(model_dir), "--bits", "3", "--group-size", "32", "--act-order",
               "--calib-samples", "4", "--out", str(out), *ARGS])
    assert rc == 0
    text = capsys.readouterr().out
    fp32, q = _ppl(text, "fp32"), _ppl(text, "gptq")
    assert q > 0 and fp32 > 0
    assert main(["eval", str(out), *ARGS]) == 0
    assert _ppl(capsys.readouterr().out, "gptq") == q


def test_rtn_per_channel(model_dir, tmp_path, capsys):
    rc = main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "per-channel", "--sym",
               "--out", str(tmp_path / "r"), *ARGS])
    assert rc == 0
    assert "per-channel" in capsys.readouterr().out


def test_nf4_format(model_dir, tmp_path, capsys):
    from qbayes import load_quantized

    rc = main(["quantize", "--model", str(model_dir), "--method", "rtn", "--format", "nf4", "--group-size", "32",
               "--out", str(tmp_path / "n"), *ARGS])
    assert rc == 0
    model, _ = load_quantized(tmp_path / "n")
    assert {v["format"] for v in model.qbayes_config["layers"].values()} == {"nf4"}
    rc = main(["quantize", "--model", str(model_dir), "--format", "nf4", "--bits", "3", "--no-eval",
               "--out", str(tmp_path / "m"), *ARGS])
    assert rc == 2 and "4-bit codes" in capsys.readouterr().err


def test_bad_group_size_is_a_clear_error(model_dir, tmp_path, capsys):
    rc = main(["quantize", "--model", str(model_dir), "--group-size", "48", "--no-eval", "--out", str(tmp_path / "x"),
               *ARGS])
    assert rc == 2
    err = capsys.readouterr().err
    assert "group size 48 does not divide" in err and "valid group sizes" in err
    assert not (tmp_path / "x").exists()


def test_eval_of_a_non_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a qbayes checkpoint" in capsys.readouterr().err


def test_bits_out_of_range_rejected_by_parser(capsys):
    assert main(["quantize", "--bits", "9"]) == 2
    assert "2..8" in capsys.readouterr().err


def test_uq_prints_uncertainty_metrics(capsys):
    rc = main(["uq", "--method", "map,laplace-ll", "--epochs", "1", "--train-subset", "300", "--test-subset", "100",
               "--threads", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    for m in ("map", "laplace-ll"):
        row = re.search(rf"\| {m} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", out)
        assert row, out
        acc, nll, ece, brier, auroc = map(float, row.groups())
        assert 0 <= acc <= 1 and nll > 0 and 0 <= ece <= 1 and 0 <= brier <= 2 and 0 <= auroc <= 1


def test_uq_unknown_method(capsys):
    assert main(["uq", "--method", "magic"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_mixed_precision_quantize_records_every_layer(model_dir, tmp_path, capsys):
    from qbayes import load_quantized

    sens = tmp_path / "sens"
    rc = main(["sensitivity", str(model_dir), "--criteria", "output,fisher,measured", "--group-size", "32",
               "--sens-windows", "2", "--sens-seqlen", "32", "--out", str(sens), "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "Spearman" in text and (sens / "sensitivity.png").stat().st_size > 1000
    out = tmp_path / "mixed"
    rc = main(["quantize", "--model", str(model_dir), "--group-size", "32", "--avg-bits", "3.5", "--allocate", "output",
               "--sensitivity", str(sens / "sensitivity.json"), "--calib-samples", "4", "--out", str(out), *ARGS])
    assert rc == 0
    assert "code bits per weight" in capsys.readouterr().out
    model, _ = load_quantized(out)
    cfg = model.qbayes_config
    layers = cfg["layers"]
    n = {k: m.in_features * m.out_features for k, m in model.named_modules() if k in layers}
    avg = sum(layers[k]["bits"] * n[k] for k in layers) / sum(n.values())
    assert avg <= 3.5 and cfg["allocation"]["code_bits_per_weight"] == pytest.approx(avg)
    assert len({v["bits"] for v in layers.values()}) > 1


def test_sensitivity_unknown_criterion(model_dir, capsys):
    assert main(["sensitivity", str(model_dir), "--criteria", "magic"]) == 2
    assert "unknown criteria" in capsys.readouterr().err


def test_bench_kernels_prints_a_speed_table(capsys):
    assert main(["bench-kernels", "--batches", "1,2", "--bits", "4", "--no-ort", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| 576") or ln.startswith("| 1536")]
    assert len(rows) == 6  # 3 SmolLM2 shapes x 2 batches
    assert main(["bench-kernels", "--bits", "5"]) == 2  # no packed CPU kernel for 5-bit codes
    if not torch.cuda.is_available():
        assert main(["bench-kernels", "--device", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_generate_prints_text_and_speed(model_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "32", "--no-eval",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "the company said", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"tokens/s \(qbayes decoder\)", text)  # a Llama: the lean decoder
    assert main(["generate", str(out), "the company said", "--max-new-tokens", "8", "--engine", "hf"]) == 0
    text_hf = capsys.readouterr().out
    assert "(hf decoder)" in text_hf
    assert text_hf.split("\n\n")[0] == text.split("\n\n")[0]  # same greedy text from both loops
    assert main(["generate", str(tmp_path / "nothing"), "x"]) == 2


def test_export_onnx_command(model_dir, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "32", "--no-eval",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(out)]) == 0
    text = capsys.readouterr().out
    assert "14 layers as MatMulNBits" in text and "max relative difference" in text
    assert (out / "model.onnx").stat().st_size > 0
    assert main(["export", str(out), "--kv-cache"]) == 0
    text = capsys.readouterr().out
    assert "decode-step logits vs qbayes" in text and (out / "model_decode.onnx").stat().st_size > 0


def test_quantize_head_bits(model_dir, tmp_path):
    from qbayes import load_quantized
    from qbayes.nn import QuantLinear

    out = tmp_path / "qh"
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "32", "--no-eval",
                 "--head-bits", "8", "--out", str(out)]) == 0
    model, _ = load_quantized(out)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.spec.bits == 8 and model.lm_head.spec.symmetric
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "48", "--no-eval",
                 "--head-bits", "8", "--out", str(tmp_path / "bad")]) == 2


def test_export_gguf_command(model_dir, tmp_path, capsys):
    pytest.importorskip("gguf")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "32", "--no-eval",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    # the tiny tokenizer is a whitespace BPE, which llama.cpp's gpt2 tokenizer would decode wrongly
    assert main(["export", str(out), "--to", "gguf"]) == 2
    assert "byte-level BPE tokenizers only" in capsys.readouterr().err and not (out / "model.gguf").exists()
    from qbayes import load_quantized
    from qbayes.export.gguf import export_gguf

    from .test_export_gguf import _write_tokenizer
    (tmp_path / "tk").mkdir()
    _write_tokenizer(tmp_path / "tk", 96)
    export_gguf(load_quantized(out)[0], tmp_path / "template.gguf", tokenizer_dir=tmp_path / "tk")
    assert main(["export", str(out), "--to", "gguf", "--template", str(tmp_path / "template.gguf")]) == 0
    text = capsys.readouterr().out
    assert "14 layers as Q4_1 without requantizing" in text
    assert (out / "model.gguf").stat().st_size > 0
    assert main(["export", str(out), "--to", "gguf", "--template", str(tmp_path / "template.gguf")]) == 2
    assert "pass --force" in capsys.readouterr().err  # an existing export is not overwritten silently
    assert main(["export", str(out), "--to", "gguf", "--template", str(tmp_path / "template.gguf"), "--force"]) == 0
    for own in ("model.safetensors", "qbayes.json", "tokenizer.json"):
        assert main(["export", str(out), "--to", "gguf", "--force", "--out", str(out / own)]) == 2
        assert "a file of the qbayes checkpoint" in capsys.readouterr().err
    load_quantized(out)  # untouched
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--bits", "3", "--group-size", "32",
                 "--no-eval", "--out", str(tmp_path / "q3")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "q3"), "--to", "gguf", "--fallback", "f16", "--out", str(tmp_path / "x.gguf"),
                 "--template", str(tmp_path / "template.gguf")]) == 0
    assert "converted 14 layers to F16 (W3 group-32 asym has no ggml block type)" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "q3"), "--to", "gguf", "--template", str(tmp_path / "none.gguf")]) == 2


def test_format_choices_come_from_the_registry():
    """A new format is one file and a registry line: the CLI offers whatever is registered."""
    from qbayes.cli.app import build_parser
    from qbayes.formats import FORMATS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    fmt = next(a for a in sub.choices["quantize"]._actions if "--format" in a.option_strings)
    assert sorted(fmt.choices) == sorted(FORMATS) and {"int", "nf4"} <= set(fmt.choices)


def test_float_targets_flag(model_dir, tmp_path, capsys):
    from qbayes import load_quantized

    rc = main(["quantize", "--model", str(model_dir), "--float-targets", "--calib-samples", "4", "--no-eval",
               "--out", str(tmp_path / "f"), *ARGS])
    assert rc == 0
    model, _ = load_quantized(tmp_path / "f")
    assert model.qbayes_config["options"]["float_targets"] is True
    rc = main(["quantize", "--model", str(model_dir), "--method", "rtn", "--float-targets", "--no-eval",
               "--out", str(tmp_path / "g"), *ARGS])
    assert rc == 2 and "--method gptq" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
