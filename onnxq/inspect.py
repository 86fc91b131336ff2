"""``onnxq inspect``: a table of quantizable (and already quantized) layers with their bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.graph import Skipped, find_targets, tensor_nbytes

QUANTIZED_OPS = {("com.microsoft", "MatMulNBits"), ("onnxq", "MatMulLowBit")}


@dataclass
class LayerRow:
    name: str
    op_type: str
    shape: tuple[int, int]  # (N, K)
    params: int
    bytes: int  # bytes of the weight as stored (codes + scales + zero points)
    bits_per_weight: float
    state: str  # "float" or "quantized"


@dataclass
class InspectReport:
    rows: list[LayerRow] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    def table(self) -> str:
        head = f"{'layer':<48} {'op':<12} {'N x K':>14} {'params':>11} {'bytes':>12} {'bits/w':>7} state"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name[:48]:<48} {r.op_type:<12} {f'{r.shape[0]}x{r.shape[1]}':>14} {r.params:>11,} "
                         f"{r.bytes:>12,} {r.bits_per_weight:>7.2f} {r.state}")
        bits = 8 * self.total_bytes / max(self.total_params, 1)
        lines.append("-" * len(head))
        lines.append(f"{'total: ' + str(len(self.rows)) + ' layers':<48} {'':<12} {'':>14} {self.total_params:>11,} "
                     f"{self.total_bytes:>12,} {bits:>7.2f}")
        for s in self.skipped:
            lines.append(f"skipped {s.op_type} '{s.name}': {s.reason}")
        return "\n".join(lines)


def _tensor_bytes(inits: dict[str, onnx.TensorProto], name: str) -> int:
    return tensor_nbytes(inits[name]) if name in inits else 0


def inspect_model(model: onnx.ModelProto) -> InspectReport:
    """Rows for float targets (fp32/fp16 bytes) and for quantized layers (their stored bytes)."""
    report = InspectReport()
    inits = {t.name: t for t in model.graph.initializer}
    found = find_targets(model)
    for t in found.targets:
        n, k = t.matrix_shape
        nbytes = _tensor_bytes(inits, t.weight_name)
        report.rows.append(LayerRow(t.name, t.op_type, (n, k), n * k, nbytes, 8 * nbytes / (n * k), "float"))
    report.skipped = [s for s in found.skipped if "no constant weight" not in s.reason]
    producers = {o: node for node in model.graph.node for o in node.output}
    for node in model.graph.node:
        name = node.name or node.output[0]
        if (node.domain, node.op_type) in QUANTIZED_OPS:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            n, k = int(attrs["N"]), int(attrs["K"])
            nbytes = sum(_tensor_bytes(inits, i) for i in node.input[1:4] if i)
            report.rows.append(LayerRow(name, node.op_type, (n, k), n * k, nbytes, 8 * nbytes / (n * k), "quantized"))
        elif node.op_type in ("MatMul", "Gemm", "Conv"):
            source = producers.get(node.input[1])
            while source is not None and source.op_type in ("Reshape", "Transpose", "Add"):
                source = producers.get(source.input[0])
            if source is None or source.op_type != "DequantizeLinear" or source.input[0] not in inits:
                continue
            dims = list(inits[source.input[0]].dims)
            params = int(np.prod(dims))
            k = params // dims[0] if node.op_type == "Conv" else (dims[0] if node.op_type == "MatMul" else dims[1])
            nbytes = sum(_tensor_bytes(inits, i) for i in source.input if i)
            report.rows.append(LayerRow(name, node.op_type + "+DQ", (params // k, k), params, nbytes,
                                        8 * nbytes / params, "quantized"))
    return report
