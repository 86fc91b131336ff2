"""onnxq: 2/3/4/8-bit weight quantization of ONNX models for ONNX Runtime."""

from onnxq.api import inspect, quantize, quantize_with_summary
from onnxq.errors import OnnxqError
from onnxq.quantized_weight import QuantizedWeight

__all__ = ["OnnxqError", "QuantizedWeight", "inspect", "quantize", "quantize_with_summary"]
__version__ = "0.1.0"
