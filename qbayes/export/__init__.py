"""Export of quantized models to other runtimes (ONNX Runtime)."""
from .onnx import export_onnx

__all__ = ["export_onnx"]
