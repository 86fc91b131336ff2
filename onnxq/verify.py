"""``onnxq verify``: run a float model and its quantized version in ONNX Runtime on the same inputs and say, per graph
output, how far the quantized output is from the float one (over all samples, as one vector per output)::

    relative L2 = ‖q − f‖ / ‖f‖,   cosine = ⟨q, f⟩ / (‖q‖·‖f‖),   max abs = max |q − f|

The inputs are calibration data (``--calib``, batched like calibration) or generated from the float model's input
specs (:func:`generated_inputs`).  Both models run through the calibration session helpers (CPU, basic graph
optimizations, so ``MatMulNBits``/``DequantizeLinear`` compute exactly; the onnxq custom-op library is registered
when the model uses ``onnxq::MatMulLowBit``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.calibration.data import batch_samples, check_feed, iter_batches, model_input_specs
from onnxq.calibration.sessions import ORT_THREADS, Feed, SessionFactory, run_session
from onnxq.calibration.sources.specs import generated_inputs
from onnxq.errors import OnnxqError
from onnxq.ir.model import load_model

DEFAULT_GENERATED = 8  # generated inputs (runs) when no calibration data is given
CHUNK = 1 << 20  # output elements per float64 block of the error sums

ModelOrPath = onnx.ModelProto | str | os.PathLike


@dataclass(frozen=True)
class OutputError:
    """How far one quantized graph output is from the float model's, over every sample."""

    name: str
    relative_l2: float
    cosine: float
    max_abs: float


@dataclass
class VerifyReport:
    outputs: list[OutputError]
    samples: int
    runs: int
    source: str  # where the inputs came from

    def table(self) -> str:
        """One header line, then one row per graph output."""
        width = max(len("output"), *(len(o.name) for o in self.outputs))
        rows = [f"verify: quantized vs float model on {self.samples} samples in {self.runs} ONNX Runtime runs "
                f"({self.source})",
                f"{'output':<{width}}  {'relative L2':>11}  {'cosine':>9}  {'max abs':>10}"]
        rows += [f"{o.name:<{width}}  {o.relative_l2:>11.4e}  {o.cosine:>9.6f}  {o.max_abs:>10.4e}"
                 for o in self.outputs]
        return "\n".join(rows)


class _ErrorSum:
    """Running ``Σ(q−f)², Σf², Σq², Σq·f`` (float64) and ``max |q−f|`` of one output."""

    def __init__(self) -> None:
        self.diff = self.ref = self.quant = self.dot = self.max_abs = 0.0

    def add(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        """Add one batch, :data:`CHUNK` elements at a time (float64 copies of LLM logits would not fit)."""
        reference, quantized = np.asarray(reference).reshape(-1), np.asarray(quantized).reshape(-1)
        for start in range(0, reference.size, CHUNK):
            f = reference[start:start + CHUNK].astype(np.float64)
            q = quantized[start:start + CHUNK].astype(np.float64)
            d = q - f
            self.diff += float(d @ d)
            self.ref += float(f @ f)
            self.quant += float(q @ q)
            self.dot += float(q @ f)
            self.max_abs = max(self.max_abs, float(np.abs(d).max(initial=0.0)))

    def result(self, name: str) -> OutputError:
        """Both zero counts as identical (relative L2 0, cosine 1)."""
        relative = np.sqrt(self.diff / self.ref) if self.ref > 0 else (0.0 if self.diff == 0 else np.inf)
        norms = np.sqrt(self.ref * self.quant)
        cosine = self.dot / norms if norms > 0 else (1.0 if self.diff == 0 else 0.0)
        return OutputError(name, float(relative), float(cosine), self.max_abs)


def verify_models(
    float_model: ModelOrPath,
    quantized_model: ModelOrPath,
    calibration: object = None,
    samples: int | None = None,
    seed: int = 0,
    threads: int = ORT_THREADS,
) -> VerifyReport:
    """Run both models on the first ``samples`` calibration samples (default all), or on ``samples`` generated
    inputs (default :data:`DEFAULT_GENERATED`, drawn with ``seed``), and measure each graph output's error."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise OnnxqError(f"--samples {samples} is out of range; use 1 or more")
    reference, quantized = _load(float_model), _load(quantized_model)
    names = check_same_interface(reference, quantized)
    if calibration is None:
        count = DEFAULT_GENERATED if samples is None else samples
        feeds: Iterable[tuple[str, Feed]] = (
            (f"generated input {index}", feed)
            for index, feed in enumerate(generated_inputs(model_input_specs(reference), count, seed)))
        source = f"inputs generated from the float model's input specs, seed {seed}"
    else:
        batches = iter_batches(calibration, model=reference)
        feeds = _first_samples(batches.with_origin(), samples)
        source = str(calibration) if isinstance(calibration, (str, os.PathLike)) else "in-memory calibration arrays"
    sums = {name: _ErrorSum() for name in names}
    total = runs = 0
    models = (reference, quantized)
    factories = [SessionFactory(model, threads, "verification") for model in models]
    try:
        runners = [(factory.session(names), model_input_specs(model)) for factory, model in zip(factories, models,
                                                                                                  strict=True)]
        for origin, feed in feeds:
            f, q = (run_session(session, names, check_feed(spec, feed, origin), origin) for session, spec in runners)
            for name in names:
                if f[name].shape != q[name].shape:
                    raise OnnxqError(f"{origin}: output '{name}' has shape {q[name].shape} in the quantized model and "
                                     f"{f[name].shape} in the float model; compare a model with its own quantized "
                                     "version")
                sums[name].add(f[name], q[name])
            total += batch_samples(feed)
            runs += 1
    finally:
        for factory in factories:
            factory.close()
    return VerifyReport([sums[name].result(name) for name in names], total, runs, source)


def _load(model: ModelOrPath) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def check_same_interface(reference: onnx.ModelProto, quantized: onnx.ModelProto) -> list[str]:
    """The graph output names (float model's order) after checking that both models declare the same outputs, with
    no conflicting rank or fixed dimension, and that the quantized model needs no input the float model lacks."""
    float_outputs = {v.name: v for v in reference.graph.output}
    quant_outputs = {v.name: v for v in quantized.graph.output}
    if set(float_outputs) != set(quant_outputs):
        raise OnnxqError(f"the models have different outputs (float: {sorted(float_outputs)}, quantized: "
                         f"{sorted(quant_outputs)}); compare a model with its own quantized version")
    for name, value in float_outputs.items():
        dims, other = _dims(value), _dims(quant_outputs[name])
        conflict = dims is not None and other is not None and (len(dims) != len(other) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(dims, other, strict=True)))
        if conflict:
            raise OnnxqError(f"output '{name}' has shape {other} in the quantized model and {dims} in the float "
                             "model; compare a model with its own quantized version")
    float_inputs = model_input_specs(reference)
    extra = [s.name for s in model_input_specs(quantized).values() if s.required and s.name not in float_inputs]
    if extra:
        raise OnnxqError(f"the quantized model needs inputs the float model does not have ({extra}); compare a model "
                         "with its own quantized version")
    return list(float_outputs)


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]


def _first_samples(batches: Iterator[tuple[str, Feed]], samples: int | None) -> Iterator[tuple[str, Feed]]:
    """The batches up to ``samples`` samples in all (the last one cut), or all batches."""
    left = samples
    for origin, feed in batches:
        if left is not None and left <= 0:
            return
        if left is not None:
            feed = {name: array[:left] for name, array in feed.items()}
            left -= batch_samples(feed)
        yield origin, feed
