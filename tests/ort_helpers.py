"""Running models in ONNX Runtime at every graph-optimization level."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Under ORT_ENABLE_ALL, ORT fuses DequantizeLinear→MatMul into MatMulNBits with int8 activations
# (≈0.5% error) unless this session option is 0; onnxq documents it for exact results.
EXACT_QDQ_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def exact_kernels(fmt: str) -> dict:
    """Quantize options for exact fp32 activations: MatMulNBits level 0 (onnxq's default at 2-3 bits is level 4)."""
    return {"accuracy_level": 0} if fmt == "matmulnbits" else {}


def session(model: onnx.ModelProto, level: str = "disable_all", config: dict | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = 2
    for key, value in (EXACT_QDQ_CONFIG if config is None else config).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict, level: str = "disable_all", config: dict | None = None) -> np.ndarray:
    return session(model, level, config).run(None, feeds)[0]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |a − e| / max |e|."""
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(np.asarray(actual, dtype=np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))
