"""Checks on the real SmolLM2-135M-Instruct (marker `slow`: minutes of CPU, model fetched from PyPI once)."""
import pytest
import torch

from qbayes.data import EVAL_TEXT, data_path, eval_windows, tokenize_file
from qbayes.eval import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from qbayes.models import load_causal_lm, smollm2_135m
    torch.set_num_threads(2)
    return load_causal_lm(str(smollm2_135m()))


def test_fp32_conversion_and_tokenization_reproduce_the_protocol(smollm2):
    model, tok = smollm2
    ids = tokenize_file(data_path(EVAL_TEXT), tok)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ppl = perplexity(model, eval_windows(ids, 512, 40), progress=False)
    assert abs(ppl - 28.74) <= 0.05, ppl

