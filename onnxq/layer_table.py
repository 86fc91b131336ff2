"""The table behind ``onnxq inspect``: quantizable (and already quantized) layers with their bytes and bits per
weight (a quantized layer's: every tensor it uses, :mod:`onnxq.quantized_size`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from onnxq.ir.llm import KEPT_FLOAT, lm_head_names
from onnxq.ir.model import tensor_nbytes
from onnxq.ir.targets import LOOKUP_OP_TYPES, SUPPORTED_OP_TYPES, Skipped, find_targets
from onnxq.quantized_size import quantized_layers

QUANTIZED_OPS = {("com.microsoft", "MatMulNBits"), ("onnxq", "MatMulLowBit"), ("com.microsoft", "GatherBlockQuantized")}


@dataclass
class LayerRow:
    name: str
    op_type: str
    shape: tuple[int, int]  # (N, K)
    params: int
    bytes: float  # bytes of the weight as stored: every tensor the layer uses (shared ones split between layers)
    bits_per_weight: float
    state: str  # "float", "float, kept" (lm_head), LOOKUP_FLOAT (an embedding lookup) or "quantized"


@dataclass
class InspectReport:
    rows: list[LayerRow] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def total_bytes(self) -> int:
        return round(sum(r.bytes for r in self.rows))

    def table(self) -> str:
        head = f"{'layer':<48} {'op':<12} {'N x K':>14} {'params':>11} {'bytes':>12} {'bits/w':>7} state"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name[:48]:<48} {r.op_type:<12} {f'{r.shape[0]}x{r.shape[1]}':>14} {r.params:>11,} "
                         f"{round(r.bytes):>12,} {r.bits_per_weight:>7.2f} {r.state}")
        bits = 8 * self.total_bytes / max(self.total_params, 1)
        lines.append("-" * len(head))
        lines.append(f"{'total: ' + str(len(self.rows)) + ' layers':<48} {'':<12} {'':>14} {self.total_params:>11,} "
                     f"{self.total_bytes:>12,} {bits:>7.2f}")
        for s in self.skipped:
            lines.append(f"skipped {s.op_type} '{s.name}': {s.reason}")
        return "\n".join(lines)


def _tensor_bytes(inits: dict[str, onnx.TensorProto], name: str) -> int:
    return tensor_nbytes(inits[name]) if name in inits else 0


def _row(name: str, op_type: str, n: int, k: int, nbytes: int, state: str) -> LayerRow:
    params = n * k
    return LayerRow(name, op_type, (n, k), params, nbytes, 8 * nbytes / params if params else 0.0, state)


LOOKUP_FLOAT = "float, with --op-types Gather"  # an embedding lookup: quantized only when asked for


def inspect_model(model: onnx.ModelProto) -> InspectReport:
    """Rows for float targets (fp32/fp16 bytes) and for quantized layers (the bytes of every tensor they use,
    :func:`~onnxq.quantized_size.quantized_layers`), a MatMul reading one of those tensors (the float-zero term's)
    being part of its layer; reads shapes and types only (no weight values), and passes over malformed nodes
    instead of failing."""
    report = InspectReport()
    inits = {t.name: t for t in model.graph.initializer}
    found = find_targets(model, SUPPORTED_OP_TYPES)  # embedding lookups too (quantized with --op-types Gather)
    quantized = quantized_layers(model)
    used = {name for layer in quantized for name in layer.tensors}  # e.g. the float-zero term's E and Z
    kept = lm_head_names(model, found.targets)  # quantize leaves these float unless --quantize-lm-head
    for t in found.targets:
        if t.weight_name not in used:
            n, k = t.matrix_shape
            state = KEPT_FLOAT if t.name in kept else LOOKUP_FLOAT if t.op_type in LOOKUP_OP_TYPES else "float"
            report.rows.append(_row(t.name, t.op_type, n, k, _tensor_bytes(inits, t.weight_name), state))
    report.skipped = [s for s in found.skipped if "no constant weight" not in s.reason]
    for layer in quantized:
        report.rows.append(LayerRow(layer.name, layer.op_type, layer.shape, layer.params, layer.bytes,
                                    layer.bits_per_weight, "quantized"))
    return report


def quantized_layer_counts(model: onnx.ModelProto) -> dict[str, int]:
    """``{kind: count}`` of the layers :func:`inspect_model` finds already quantized (``MatMulNBits``,
    ``MatMulLowBit``, ``GatherBlockQuantized``, ``DequantizeLinear weights``), in order of first appearance; empty
    when any float product is left (such a model is quantizable; a float embedding lookup alone does not count, as
    it is quantized only when asked for)."""
    rows = inspect_model(model).rows
    if any(r.state == "float" for r in rows):
        return {}
    counts: dict[str, int] = {}
    for r in rows:
        kind = "DequantizeLinear weights" if r.op_type.endswith("+DQ") else r.op_type
        counts[kind] = counts.get(kind, 0) + 1
    return counts
