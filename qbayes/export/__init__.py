"""Export of quantized models to other runtimes (ONNX Runtime, llama.cpp)."""
from .gguf import export_gguf
from .onnx import export_onnx

__all__ = ["export_gguf", "export_onnx"]
