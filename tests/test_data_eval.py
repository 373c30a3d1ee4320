"""Token windows follow the protocol; perplexity matches closed forms."""
import math

import pytest
import torch
from torch import nn

from qbayes.data import calibration_windows, eval_windows, tokenize_file
from qbayes.errors import CalibrationError, QBayesError
from qbayes.eval import perplexity


def test_calibration_offsets_follow_the_protocol():
    ids = torch.arange(5000)
    w = calibration_windows(ids, 512, 64, seed=0)
    offs = torch.randint(0, 5000 - 512 + 1, (64,), generator=torch.Generator().manual_seed(0))
    assert w.shape == (64, 512)
    assert torch.equal(w[:, 0], offs) and torch.equal(w[:, -1], offs + 511)


def test_eval_windows_are_the_first_non_overlapping():
    ids = torch.arange(2000)
    w = eval_windows(ids, 100, 7)
    assert torch.equal(w.flatten(), torch.arange(700))
    with pytest.raises(QBayesError, match="only 20 windows"):
        eval_windows(ids, 100, 21)


def test_bad_calibration_text(tmp_path):
    with pytest.raises(CalibrationError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 512, 4)
    with pytest.raises(CalibrationError, match="positive"):
        calibration_windows(torch.arange(1000), 512, 0)
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        tokenize_file(tmp_path / "e.txt", None)
    with pytest.raises(QBayesError, match="not found"):
        tokenize_file(tmp_path / "missing.txt", None)


class _Out:
    def __init__(self, logits):
        self.logits = logits


class Uniform(nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return _Out(torch.zeros(*input_ids.shape, self.vocab) + self.p)


class Oracle(nn.Module):
    """Puts probability q on the true next token (known from the window), the rest spread evenly."""

    def __init__(self, vocab, q):
        super().__init__()
        self.vocab, self.q = vocab, q
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        nxt = torch.roll(input_ids, -1, dims=1)
        probs = torch.full((*input_ids.shape, self.vocab), (1 - self.q) / (self.vocab - 1))
        probs.scatter_(-1, nxt.unsqueeze(-1), self.q)
        return _Out(probs.log())


def test_perplexity_closed_forms():
    windows = torch.randint(0, 50, (5, 33), generator=torch.Generator().manual_seed(0))
    assert math.isclose(perplexity(Uniform(50), windows, batch_size=2, progress=False), 50.0, rel_tol=1e-6)
    assert math.isclose(perplexity(Oracle(50, 0.25), windows, batch_size=3, progress=False), 4.0, rel_tol=1e-5)
