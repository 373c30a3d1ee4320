"""Number formats as pure functions (torch only)."""
from .int_affine import (
    PER_CHANNEL,
    PER_TENSOR,
    QuantizedWeight,
    dequantize,
    fake_quantize,
    group_view,
    max_code,
    params_from_range,
    quantize,
    quantize_float,
    round_scale_up,
)
from .packing import pack, packed_length, unpack

__all__ = [
    "PER_CHANNEL", "PER_TENSOR", "QuantizedWeight", "dequantize", "fake_quantize", "group_view",
    "max_code", "params_from_range", "quantize", "quantize_float", "round_scale_up", "pack", "packed_length", "unpack",
]
