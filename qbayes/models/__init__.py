"""Model adapters (the seam between models and everything that calibrates, scores or samples
them), loaders, and the offline model zoo."""
from .adapter import ADAPTERS, ModelAdapter, adapter_for, register_adapter
from .module import ModuleAdapter  # registered first: the fallback, tried last
from .hf_encoder import ENCODER_PATHS, EncoderAdapter, load_encoder
from .hf_decoder import BLOCK_PATHS, DecoderAdapter, load_causal_lm
from .cnn import fashion_cnn, split_last_layer
from .unet import UNetAdapter
from .zoo import minilm_l6, smollm2_135m

__all__ = ["ADAPTERS", "BLOCK_PATHS", "DecoderAdapter", "ENCODER_PATHS", "EncoderAdapter", "ModelAdapter",
           "ModuleAdapter", "adapter_for", "fashion_cnn", "load_causal_lm", "load_encoder", "minilm_l6", "register_adapter",
           "smollm2_135m", "split_last_layer", "UNetAdapter"]
