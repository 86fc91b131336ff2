"""``onnxq demo``: quantize the built-in digits models and compare accuracy, size and latency with fp32."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.config import QuantizeConfig
from onnxq.ir.model import load_model, model_bytes
from onnxq.ir.targets import find_targets
from onnxq.pipeline import quantize_copy

MODEL_INPUTS = {"mlp": "pixels", "cnn": "image"}
FORMATS = ("matmulnbits", "qdq", "fake")
DEMO_GROUP_SIZE = 32  # the digits layers are small (K = 9..128)


@dataclass
class DemoRow:
    model: str
    bits: int | None  # None: fp32
    format: str
    accuracy: float
    weight_bytes: int
    latency_ms: float


def data_path(name: str) -> str:
    """Path of a file shipped in ``onnxq/data``."""
    return str(resources.files("onnxq") / "data" / name)


def builtin_model(name: str) -> onnx.ModelProto:
    """The committed digits model ``mlp`` or ``cnn`` (see models/digits.py for how it was trained)."""
    return load_model(data_path(f"digits_{name}.onnx"))


def builtin_test_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(data_path("digits_test.npz"))
    return data[MODEL_INPUTS[name]], data["labels"]


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session; DequantizeLinear→MatMul fusion is told to stay exact (accuracy level 0)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def evaluate(model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray, name: str,
             repeats: int = 20) -> tuple[float, float]:
    """(top-1 accuracy, median latency in ms of one batch of 16 samples)."""
    sess = session(model)
    feed = MODEL_INPUTS[name]
    logits = sess.run(None, {feed: inputs})[0]
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    batch = {feed: inputs[:16]}
    sess.run(None, batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, batch)
        times.append((time.perf_counter() - start) * 1e3)
    return accuracy, statistics.median(times)


def demo_rows(models: tuple[str, ...] = ("mlp", "cnn"), bits: tuple[int, ...] = (2, 4, 8)) -> list[DemoRow]:
    rows = []
    for name in models:
        model = builtin_model(name)
        inputs, labels = builtin_test_set(name)
        accuracy, latency = evaluate(model, inputs, labels, name)
        rows.append(DemoRow(name, None, "fp32", accuracy, model_bytes(model), latency))
        for b in bits:
            for fmt in FORMATS:
                config = QuantizeConfig(bits=b, group_size=DEMO_GROUP_SIZE, format=fmt, progress=False)
                quantized, _ = quantize_copy(model, config)
                accuracy, latency = evaluate(quantized, inputs, labels, name)
                rows.append(DemoRow(name, b, fmt, accuracy, model_bytes(quantized), latency))
    return rows


@dataclass
class MethodRow:
    model: str
    method: str  # "fp32", "rtn", "gptq", "decoupleq", "split+rtn"
    accuracy: float
    bits_per_weight: float  # every byte the quantized layers use, per weight of the original layers
    latency_ms: float
    seconds: float  # time to quantize


METHODS = {"rtn": {}, "gptq": {"method": "gptq"}, "decoupleq": {"method": "decoupleq"}, "split+rtn": {"split": True}}


def method_rows(models: tuple[str, ...] = ("mlp", "cnn"), bits: int = 2) -> list[MethodRow]:
    """Each method at ``bits`` bits (group size 32, default format), calibrated on the committed train-split
    samples (``digits_calib.npz``), scored on the held-out split."""
    rows = []
    for name in models:
        model = builtin_model(name)
        inputs, labels = builtin_test_set(name)
        accuracy, latency = evaluate(model, inputs, labels, name)
        rows.append(MethodRow(name, "fp32", accuracy, 32.0, latency, 0.0))
        weights = {t.weight_name: t.matrix_shape for t in find_targets(model).targets}
        params = sum(n * k for n, k in weights.values())
        for label, options in METHODS.items():
            calibration = data_path("digits_calib.npz") if options.get("method") else None
            config = QuantizeConfig(bits=bits, group_size=DEMO_GROUP_SIZE, calibration=calibration, progress=False,
                                    **options)
            quantized, summary = quantize_copy(model, config)
            accuracy, latency = evaluate(quantized, inputs, labels, name)
            added = summary.bytes_after - summary.bytes_before + 4 * params  # the float layers' bytes replaced
            rows.append(MethodRow(name, label, accuracy, 8 * added / params, latency, summary.seconds))
    return rows


def method_table(rows: list[MethodRow]) -> str:
    lines = ["| model | method | accuracy | Δ vs fp32 | bits/weight | latency (ms, 16 rows) | quantize (s) |",
             "|---|---|---|---|---|---|---|"]
    base = {r.model: r for r in rows if r.method == "fp32"}
    for r in rows:
        lines.append(f"| {r.model} | {r.method} | {r.accuracy:.4f} | {r.accuracy - base[r.model].accuracy:+.4f} | "
                     f"{r.bits_per_weight:.2f} | {r.latency_ms:.3f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def format_table(rows: list[DemoRow]) -> str:
    lines = ["| model | bits | format | accuracy | Δ vs fp32 | weight bytes | size vs fp32 | latency (ms, 16 rows) |",
             "|---|---|---|---|---|---|---|---|"]
    base: dict[str, DemoRow] = {}
    for r in rows:
        if r.bits is None:
            base[r.model] = r
        ref = base[r.model]
        lines.append(f"| {r.model} | {r.bits or 32} | {r.format} | {r.accuracy:.4f} | {r.accuracy - ref.accuracy:+.4f} "
                     f"| {r.weight_bytes:,} | {r.weight_bytes / ref.weight_bytes:.3f} | {r.latency_ms:.3f} |")
    return "\n".join(lines)


def run_demo(models: tuple[str, ...] = ("mlp", "cnn"), bits: tuple[int, ...] = (2, 4, 8)) -> str:
    """The two tables ``onnxq demo`` prints: the methods at 2 bits, then RTN at each bit width in every format."""
    methods = (f"onnxq demo: 2-bit weights (group size {DEMO_GROUP_SIZE}, default format), the held-out split of "
               "scikit-learn's digits (models/digits.py); gptq/decoupleq calibrated on 128 train-split samples\n")
    formats = (f"\nRTN, asymmetric, group size {DEMO_GROUP_SIZE}, each bit width in every format:\n")
    return methods + method_table(method_rows(models)) + "\n" + formats + format_table(demo_rows(models, bits))
