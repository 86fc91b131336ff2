"""Running zoo models in ORT and scoring a quantized copy against the float model.

The score of a quantized model is the **cosine similarity** of its outputs to the float model's on the same real
inputs: each model names the arrays to compare (``[rows, features]``: one row per image, per sentence embedding
or per token's logits, see :class:`models.zoo.ZooModel`); the score is the smallest, over those arrays, of the
mean row cosine. :func:`quantize_row` runs one ``onnxq quantize`` setting end to end (quantize, save,
``onnx.checker``, ORT load and run, score) and :func:`split_row` checks ``onnxq split`` is exact.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    from models.zoo import ZooModel

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
SPLIT_TOLERANCE = 1e-5
EXACT_QDQ = {"session.qdq_matmulnbits_accuracy_level": "0"}  # README: exact DequantizeLinear→MatMul fusion


def session(path: Path, custom_ops: bool = False, optimize: bool = True):
    """A 2-thread CPU session (default optimizations or none, exact QDQ fusion; the onnxq custom op when asked)."""
    import onnxruntime as ort

    import onnxq

    options = onnxq.session_options(intra_op_num_threads=2) if custom_ops else ort.SessionOptions()
    options.intra_op_num_threads = 2
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in EXACT_QDQ.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(path: Path, feeds: Feeds, custom_ops: bool = False, optimize: bool = True) -> Outputs:
    """All outputs of the model at ``path`` on ``feeds`` (by output name)."""
    sess = session(path, custom_ops, optimize)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def max_relative_error(actual: Outputs, expected: Outputs) -> float:
    """``max`` over outputs of ``max|a − e| / max|e|`` (float64)."""
    return max(float(np.abs(actual[k].astype(np.float64) - expected[k]).max() / max(np.abs(expected[k]).max(), 1e-30))
               for k in expected)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (float64; 1 where both rows are zero)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    both_zero = (np.abs(a).sum(1) == 0) & (np.abs(b).sum(1) == 0)
    return np.where(both_zero, 1.0, dots / np.maximum(norms, 1e-300))


def similarity(parts: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """``min`` over the compared arrays of the mean row cosine (NaN anywhere → NaN)."""
    scores = [float(row_cosines(parts[name], reference[name]).mean()) for name in reference]
    return min(scores)


def per_sample(outputs: Outputs, feeds: Feeds) -> dict[str, np.ndarray]:
    """Every output flattened per sample (axis 0): one row per image / batch item."""
    return {name: value.reshape(len(value), -1) if value.ndim > 1 else value.reshape(1, -1)
            for name, value in outputs.items()}


@dataclass
class RowResult:
    """One zoo measurement: a setting applied to a model."""

    model: str
    setting: str
    metric: float = float("nan")
    quantized: list[str] = field(default_factory=list)  # names of the quantized layers
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op type, reason)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    weights: list[str] = field(default_factory=list)  # initializers of the quantized layers
    noise: float = 0.0  # split: the float model's own ORT rounding noise (optimized vs unoptimized, max rel.)


@functools.cache
def checker_error(path: Path) -> str | None:
    """``onnx.checker``'s complaint about the model at ``path``, or ``None`` if it passes."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        return str(exc).strip().splitlines()[0]
    return None


def _check_output(source: Path, out: Path, result: RowResult) -> None:
    """The output must pass ``onnx.checker`` when the input does (a model using ORT contrib ops in the ONNX
    domain, as onnxruntime-genai's exports do, fails it before onnxq touches it)."""
    complaint = checker_error(source)
    if complaint is None:
        onnx.checker.check_model(str(out))
    else:
        result.notes.append(f"input fails onnx.checker ({complaint}); output not checked")


@functools.cache
def reference_parts(name: str) -> dict[str, np.ndarray]:
    """The float model's compared arrays on its evaluation inputs (computed once per process)."""
    from models.zoo import ZOO

    entry = ZOO[name]
    path = entry.build()
    feeds = entry.inputs(path)
    return entry.parts(run(path, feeds), feeds)


def quantize_row(entry: ZooModel, workdir: Path, setting: str, **options: object) -> RowResult:
    """``onnxq.quantize`` the model with ``options`` into ``workdir``; check, load, run and score it."""
    import onnxq

    result = RowResult(entry.name, setting)
    path = entry.build()
    out = workdir / f"{entry.name}.{setting.replace(' ', '_')}.onnx"
    if options.get("method", "rtn") != "rtn":
        options = {**options, "calibration": entry.calibration(path)}
    start = time.perf_counter()
    try:
        _, summary = onnxq.quantize_with_summary(path, out, **options)
        result.seconds = time.perf_counter() - start
        result.quantized = [layer.name for layer in summary.layers]
        result.weights = [layer.weight for layer in summary.layers]
        result.skipped = [(s.name, s.op_type, s.reason) for s in summary.skipped]
        result.notes = list(summary.notes)
        _check_output(path, out, result)
        feeds = entry.inputs(path)
        outputs = run(out, feeds, custom_ops=options.get("format") == "onnxq")
        result.metric = similarity(entry.parts(outputs, feeds), reference_parts(entry.name))
    except Exception as exc:  # recorded, never hidden: the tests assert error is None
        result.error = _error(exc)
        result.seconds = time.perf_counter() - start
    finally:
        _remove_model(out)
    return result


def split_row(entry: ZooModel, workdir: Path) -> RowResult:
    """``onnxq.split`` the model; the metric is the max relative output error ``max|Δ| / max|y|`` (float math), and
    ``noise`` the same measure between the float model run with and without ORT's graph optimizations."""
    import onnxq

    result = RowResult(entry.name, "split")
    path = entry.build()
    out = workdir / f"{entry.name}.split.onnx"
    start = time.perf_counter()
    try:
        onnxq.split(path, out)
        result.seconds = time.perf_counter() - start
        _check_output(path, out, result)
        feeds = entry.inputs(path)
        expected = run(path, feeds)
        result.metric = max_relative_error(run(out, feeds), expected)
        result.noise = max_relative_error(run(path, feeds, optimize=False), expected)
    except Exception as exc:
        result.error = _error(exc)
    finally:
        _remove_model(out)
    return result


WEIGHT_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,)}  # where a weight can sit


def weight_layers(path: Path) -> list[tuple[str, str, str]]:
    """``(node, op_type, weight)`` of every MatMul/Gemm/Conv/ConvTranspose, in any (sub)graph, one of whose weight
    inputs is a constant: an initializer or ``Constant`` output of its own or an enclosing graph, or the
    ``Transpose`` of one. Node names follow onnxq's summary (``name`` or else the first output)."""
    model = onnx.load(str(path), load_external_data=False)
    found: list[tuple[str, str, str]] = []
    _scan(model.graph, set(), found)
    return found


def _scan(graph: onnx.GraphProto, outer: set[str], found: list[tuple[str, str, str]]) -> None:
    constants = set(outer) | {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in constants}
    constants |= set(transposed)
    for node in graph.node:
        weights = [node.input[i] for i in WEIGHT_INPUTS.get(node.op_type, ())
                   if i < len(node.input) and node.input[i] in constants]
        if weights:
            found.append((node.name or node.output[0], node.op_type, transposed.get(weights[0], weights[0])))
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _scan(sub, constants, found)


def unreported_layers(path: Path, row: RowResult) -> list[str]:
    """Weight layers of the model that ``row``'s summary neither quantized (by node or by weight, which shared
    weights are reported by) nor listed as skipped with a reason."""
    reported = set(row.quantized) | set(row.weights) | {node for node, _, reason in row.skipped if reason.strip()}
    return [f"{node} ({op})" for node, op, weight in weight_layers(path) if not {node, weight} & reported]


def split_tolerance(row: RowResult) -> float:
    """``onnxq split`` is exact in real arithmetic: its error may not exceed 1e-5 relative, nor twice the float
    model's own rounding noise where that is larger (deep nets: ORT's optimized vs unoptimized outputs differ by
    ~1e-5; float16 models by ~1e-4)."""
    return max(SPLIT_TOLERANCE, 2 * row.noise)


def _error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def _remove_model(path: Path) -> None:
    for file in (path, path.with_name(path.name + ".data")):
        file.unlink(missing_ok=True)
