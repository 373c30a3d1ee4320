"""Matmuls on packed weights. Only the torch reference path exists so far."""
from .reference import dequantize_packed, linear

__all__ = ["dequantize_packed", "linear"]
