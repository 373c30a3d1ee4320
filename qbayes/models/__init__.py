"""Model adapters (where blocks and linears are) and the offline model zoo."""
from .hf_decoder import BLOCK_PATHS, DecoderAdapter, adapter_for, load_causal_lm
from .zoo import smollm2_135m

__all__ = ["BLOCK_PATHS", "DecoderAdapter", "adapter_for", "load_causal_lm", "smollm2_135m"]
