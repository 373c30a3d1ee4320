"""The shipped image classifiers: the ported Keras CIFAR-10 CNN reproduces its published test
accuracy (76.6% on the JPEG test set), the Fashion-MNIST nets reproduce the accuracy their
training script recorded, and foreign or mismatched weight files are refused."""
import json
from pathlib import Path

import pytest
import torch

from qbayes.data import load_cifar10_test, load_image_dataset
from qbayes.errors import CheckpointError, QBayesError
from qbayes.models import vision

BENCH_MODELS = Path(__file__).resolve().parents[1] / "bench" / "models"


def _top1(model, x, y):
    with torch.no_grad():
        return float(torch.cat([model(b).argmax(1) for b in x.split(1000)]).eq(y).float().mean())


def test_ported_cifar10_cnn_reproduces_the_published_accuracy():
    x, y = load_cifar10_test()
    assert _top1(vision.load_vision("cifar10-cnn"), x, y) == pytest.approx(0.766, abs=0.002)
    xc, _ = load_cifar10_test("calib")
    xe, _ = load_cifar10_test("eval")
    assert len(xc) == 1000 and len(xe) == 9000 and torch.equal(torch.cat([xc, xe]), x)


@pytest.mark.parametrize("name", ["fmnist-mobilenet", "fmnist-vit"])
def test_trained_fashion_nets_reproduce_their_recorded_accuracy(name):
    rec = json.loads((BENCH_MODELS / f"{name}.json").read_text())
    x, y = load_image_dataset("fashion-mnist", "test", normalize=None)
    assert _top1(vision.load_vision(name), x, y) == pytest.approx(rec["test_top1"], abs=1e-4)
    assert rec["test_top1"] > 0.85


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr(vision, "WEIGHTS", tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        vision.load_vision("cifar10-cnn")
    state = vision.cifar10_cnn().state_dict()
    state["0.weight"] = torch.zeros(64, 3, 5, 5)
    save_file(state, str(tmp_path / "cifar10-cnn.safetensors"))
    with pytest.raises(CheckpointError, match="does not match"):
        vision.load_vision("cifar10-cnn")
    del state["0.weight"]
    save_file(state, str(tmp_path / "cifar10-cnn.safetensors"))
    with pytest.raises(CheckpointError, match="does not match"):
        vision.load_vision("cifar10-cnn")
    with pytest.raises(QBayesError, match="unknown vision model"):
        vision.load_vision("resnet")
