"""The shipped classifiers' calibration images are never evaluation images, and top-1 counts
arg-max hits."""
import torch
from torch import nn

from qbayes.data import classifier_splits, load_cifar10_test
from qbayes.eval import top1


def test_cifar_calibration_is_disjoint_from_evaluation():
    calib, xe, ye = classifier_splits("cifar10-cnn")
    full, _ = load_cifar10_test("all")
    assert len(calib) == 1000 and len(xe) == len(ye) == len(full) - 1000
    assert torch.equal(torch.cat([calib, xe]), full)


def test_fmnist_calibration_comes_from_the_training_split():
    calib, xe, ye = classifier_splits("fmnist-mobilenet")
    assert len(calib) == 1000 and len(xe) == 10_000 and calib.shape[1:] == xe.shape[1:]
    again, _, _ = classifier_splits("fmnist-vit")
    assert torch.equal(calib, again)  # seeded


def test_top1_counts_argmax_hits():
    class Fixed(nn.Module):
        def forward(self, x):
            return x
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert top1(Fixed(), logits, torch.tensor([1, 1, 1, 0]), batch_size=3) == 0.75
