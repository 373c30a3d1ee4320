import os

# Triton reads TRITON_INTERPRET when its own modules are imported (torch and transformers import
# it), so on a machine without an NVIDIA GPU the interpreter is switched on before anything else:
# the Triton kernels are then tested on the CPU (tests/test_kernels_triton.py).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM  # noqa: E402

VOCAB = 96
# The tiny-model end-to-end tests also run on a GPU: QBAYES_TEST_DEVICE=cuda python -m pytest tests/test_end_to_end.py
DEVICE = os.environ.get("QBAYES_TEST_DEVICE", "cpu")


def tiny_llama(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(seed=0):
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=64, max_position_embeddings=128, use_cache=False)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(params=["llama", "opt"])
def tiny_model(request):
    return {"llama": tiny_llama, "opt": tiny_opt}[request.param]().to(DEVICE)


@pytest.fixture
def calib_ids():
    return torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama saved with a small BPE tokenizer trained on the calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qbayes.data import CALIB_TEXT, data_path

    d = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(data_path(CALIB_TEXT))], trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d)
    tiny_llama().save_pretrained(d)
    return d
