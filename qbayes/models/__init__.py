"""Model adapters (where blocks and linears are) and the offline model zoo."""
from .hf_decoder import BLOCK_PATHS, DecoderAdapter, adapter_for, load_causal_lm
from .cnn import fashion_cnn, split_last_layer
from .zoo import smollm2_135m

__all__ = ["fashion_cnn", "split_last_layer", "BLOCK_PATHS", "DecoderAdapter", "adapter_for", "load_causal_lm", "smollm2_135m"]
