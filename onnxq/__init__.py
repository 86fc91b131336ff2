"""onnxq: 2/3/4/8-bit weight quantization of ONNX models for ONNX Runtime."""

from onnxq.api import convert, convert_with_summary, inspect, quantize, quantize_with_summary, split, split_with_report
from onnxq.custom_ops import library_path, session_options
from onnxq.errors import OnnxqError
from onnxq.quantized_weight import QuantizedWeight

__all__ = [
    "OnnxqError",
    "QuantizedWeight",
    "convert",
    "convert_with_summary",
    "inspect",
    "library_path",
    "quantize",
    "quantize_with_summary",
    "session_options",
    "split",
    "split_with_report",
]
__version__ = "0.1.0"
