"""Number formats as pure functions (torch only), and their registry."""
from .base import PER_CHANNEL, PER_TENSOR, Format, QuantizedWeight, group_view, round_scale_up
from .int_affine import dequantize, fake_quantize, max_code, params_from_range, quantize, quantize_float
from .packing import pack, packed_length, unpack
from .registry import FORMATS, get_format, register_format

__all__ = [
    "FORMATS", "Format", "PER_CHANNEL", "PER_TENSOR", "QuantizedWeight", "dequantize", "fake_quantize", "get_format",
    "group_view", "max_code", "params_from_range", "quantize", "quantize_float", "register_format",
    "round_scale_up", "pack", "packed_length", "unpack",
]
