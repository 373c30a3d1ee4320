"""``qbayes export`` of an activation-quantized checkpoint: the shipped MobileNet after BN folding and
CLE (a skeleton the exporter must rebuild) becomes a QDQ ONNX model whose ONNX Runtime predictions
match the same recipe run through the Python API; checkpoints it cannot rebuild are clear errors."""
import onnx
import torch
from torch import nn

from qbayes import ActSpec, QuantSpec, quantize_, quantize_activations_, save_quantized
from qbayes.cli import main
from qbayes.data import classifier_splits
from qbayes.export.onnx_qdq import ort_session
from qbayes.models.vision import load_vision
from qbayes.transforms.pipeline import apply_rewrites


def test_mobilenet_checkpoint_exports_as_qdq(tmp_path, capsys):
    ckpt = tmp_path / "m"
    assert main(["quantize", "--model", "fmnist-mobilenet", "--bits", "8", "--method", "rtn", "--act-bits", "8",
                 "--transforms", "bnfold,cle", "--no-eval", "--out", str(ckpt), "--threads", "2"]) == 0
    capsys.readouterr()
    assert main(["export", str(ckpt)]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "top-1 agreement" in text and "as QuantizeLinear/DequantizeLinear" in text
    ops = {n.op_type for n in onnx.load(str(ckpt / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "BatchNormalization" not in ops

    # the same recipe through the API, scored against ONNX Runtime on evaluation images
    calib, xe, _ = classifier_splits("fmnist-mobilenet")
    ref = load_vision("fmnist-mobilenet")
    apply_rewrites(ref, ["bnfold", "cle"], calib)
    quantize_activations_(ref, ActSpec(8), calib, exclude=("*embed*",), batch_size=100, progress=False)
    quantize_(ref, QuantSpec(8, -1, symmetric=True, clip="mse", scale_dtype="float32"), "rtn", convs=True,
              exclude=("*embed*",), float_dtype="float32", progress=False)
    x = xe[:200]
    sess = ort_session(ckpt / "model.onnx")
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = ref(x)
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.99
    assert float((got - want).abs().max() / want.abs().max()) < 0.05


def test_a_foreign_module_checkpoint_is_a_clear_error(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    quantize_activations_(model, ActSpec(8), [torch.randn(32, 8)], progress=False)
    quantize_(model, QuantSpec(8, -1), "rtn", progress=False)
    save_quantized(model, tmp_path / "s")
    assert main(["export", str(tmp_path / "s")]) == 2
    assert "not one of qbayes's shipped classifiers" in capsys.readouterr().err
    assert not (tmp_path / "s" / "model.onnx").exists()
