"""Export of quantized models to other runtimes (ONNX Runtime, llama.cpp)."""
from .gguf import export_gguf
from .onnx import export_onnx
from .onnx_qdq import check_qdq, export_qdq

__all__ = ["check_qdq", "export_gguf", "export_onnx", "export_qdq"]
