"""onnxq: 2/3/4/8-bit weight quantization of ONNX models for ONNX Runtime.

The public names are imported on first use (PEP 562), so ``import onnxq.<module>`` (e.g. a solver worker process)
does not load ``onnx`` and ONNX Runtime when it does not need them.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "OnnxqError": "onnxq.errors",
    "QuantizedWeight": "onnxq.quantized_weight",
    "convert": "onnxq.api",
    "convert_with_summary": "onnxq.api",
    "inspect": "onnxq.api",
    "library_path": "onnxq.custom_ops",
    "quantize": "onnxq.api",
    "quantize_with_summary": "onnxq.api",
    "session_options": "onnxq.custom_ops",
    "split": "onnxq.api",
    "split_with_report": "onnxq.api",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'onnxq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
