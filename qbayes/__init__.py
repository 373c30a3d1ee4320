"""qbayes: quantize a trained PyTorch network and measure what was lost."""
from .api import quantize_, quantize_activations_, to_int8_
from .errors import CalibrationError, CheckpointError, QBayesError
from .io import load_quantized, save_quantized
from .spec import ActSpec, QuantSpec

__version__ = "0.1.0"
__all__ = ["ActSpec", "QuantSpec", "quantize_", "quantize_activations_", "to_int8_", "save_quantized", "load_quantized", "QBayesError", "CheckpointError",
           "CalibrationError", "__version__"]
