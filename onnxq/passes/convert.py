"""The convert pass: re-emit a quantized model in another format from its stored codes, scales and zeros.

Each quantized layer is read back (:mod:`onnxq.formats.read_fused`, :mod:`onnxq.formats.read_qdq`) as a float
node reading a data-less placeholder weight plus the :class:`QuantizedWeight` of that weight; the rebuilt graph
then goes through the same emission as the quantize pass (:func:`onnxq.passes.emit.emit_in_place`), so the
new format dequantizes to exactly the stored weights: nothing is solved again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.config import default_accuracy_level
from onnxq.errors import OnnxqError
from onnxq.formats.lowbit_layout import DOMAIN as ONNXQ_DOMAIN
from onnxq.formats.read_common import GraphView, ReadLayer
from onnxq.formats.read_fused import PLACEHOLDER, ReadHints, read_lowbit, read_matmulnbits
from onnxq.formats.read_gather import read_lookup
from onnxq.formats.read_qdq import read_qdq_layers, weight_dequantize_nodes
from onnxq.formats.registry import EMITTERS
from onnxq.ir.index import NameScope, node_name, remove_unused, replace_nodes, tensor_types
from onnxq.ir.metadata import QUANT_METADATA_KEY, metadata_json, set_metadata
from onnxq.ir.model import model_bytes
from onnxq.ir.targets import SUPPORTED_OP_TYPES, find_targets
from onnxq.layer_table import QUANTIZED_OPS
from onnxq.passes.emit import emit_in_place, raise_opset_for
from onnxq.quantized_weight import QuantizedWeight

READERS = {("com.microsoft", "MatMulNBits"): read_matmulnbits, (ONNXQ_DOMAIN, "MatMulLowBit"): read_lowbit,
           ("com.microsoft", "GatherBlockQuantized"): read_lookup}
BIAS_STAND_IN = "\x00onnxq_convert_bias:"
FAKE_REFUSAL = "fake stores float weights; quantize the float model instead"
CUSTOM_DOMAINS = ("com.microsoft", ONNXQ_DOMAIN)  # imports dropped when no node uses them any more


@dataclass
class ConvertSummary:
    layers: int = 0
    source_format: str = ""
    format: str = ""
    notes: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        ratio = self.bytes_before / max(self.bytes_after, 1)
        return [f"converted {self.layers} layers from {self.source_format} to {self.format} in {self.seconds:.1f}s "
                "(no re-solve: the stored codes, scales and zeros)",
                f"weights: {self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB ({ratio:.2f}x)",
                *(f"note: {note}" for note in dict.fromkeys(self.notes))]


def check_format(format_name: str) -> None:
    """A one-line error unless ``format_name`` is an output format."""
    if format_name not in EMITTERS:
        raise OnnxqError(f"unknown format '{format_name}'; choose one of {', '.join(EMITTERS)}")


def convert_in_place(model: onnx.ModelProto, format_name: str, accuracy_level: int | None = None) -> ConvertSummary:
    """Rewrite every quantized layer of ``model`` in ``format_name`` from its stored values; returns what it did.

    A layer's weight ``w = s·(q − zp) + z`` is read exactly as stored and emitted again; only what a format
    cannot hold changes form (e.g. MatMulLowBit's ``z`` becomes MatMulNBits' zero point when it is ``−s·zp``
    exactly, else a float-zero term)."""
    check_format(format_name)
    start = time.perf_counter()
    summary = ConvertSummary(format=format_name, bytes_before=model_bytes(model))
    meta = metadata_json(model, QUANT_METADATA_KEY)
    summary.source_format = str(meta.get("format", "unknown"))
    if meta.get("format") == "fake":
        raise OnnxqError(FAKE_REFUSAL)
    hints = ReadHints(meta.get("bits"), meta.get("group_size"), bool(meta))
    ranks = {name: rank for name, (_, rank) in tensor_types(model).items() if rank is not None}
    view = GraphView(model, ranks)
    layers = read_layers(view, hints, summary.notes)
    if not layers:
        raise OnnxqError("no quantized layers found (MatMulNBits, MatMulLowBit, GatherBlockQuantized or "
                         "DequantizeLinear of constant codes): the model is not quantized by onnxq; nothing to convert")
    weights, bias_names, storage = _rebuild(model, layers)
    targets = [t for t in find_targets(model, SUPPORTED_OP_TYPES).targets if t.weight_name in weights]
    bits = min(qw.bits for qw in weights.values())
    if raise_opset_for(model, format_name, targets, [weights[t.weight_name].group_size for t in targets], bits):
        targets = [t for t in find_targets(model, SUPPORTED_OP_TYPES).targets if t.weight_name in weights]
    if len(targets) != len(layers):
        raise OnnxqError(f"internal error: {len(layers)} layers read but {len(targets)} rebuilt; nothing was "
                         "written; please report it with the model")
    level = default_accuracy_level(bits) if accuracy_level is None else accuracy_level
    summary.notes += emit_in_place(model, targets, {t.matrix_key: weights[t.weight_name] for t in targets},
                                   format_name, level, {t.matrix_key: storage[t.weight_name] for t in targets})
    _restore_names(model, bias_names)
    _drop_unused_domains(model)
    set_metadata(model, QUANT_METADATA_KEY, json.dumps({**meta, "format": format_name}, sort_keys=True))
    summary.layers = len(layers)
    summary.bytes_after = model_bytes(model)
    summary.seconds = time.perf_counter() - start
    return summary


def read_layers(view: GraphView, hints: ReadHints, notes: list[str]) -> list[ReadLayer]:
    """Every quantized layer of the main graph, in node order; other quantized ops are left as they are (noted)."""
    layers = []
    for index, node in enumerate(view.nodes):
        reader = READERS.get((node.domain, node.op_type))
        if reader is not None:
            layers.append(reader(view, index, hints))
        elif (node.domain, node.op_type) in QUANTIZED_OPS or node.domain == "com.microsoft" and "Quant" in \
                node.op_type:
            notes.append(f"{node.op_type} node '{node_name(node)}' is left as it is")
    for index in weight_dequantize_nodes(view):
        layers += read_qdq_layers(view, index, hints)
    taken: dict[int, str] = {}
    for layer in layers:
        for index in [layer.node_index, *layer.absorbed]:
            if taken.setdefault(index, layer.weight_name) != layer.weight_name:
                raise OnnxqError(f"node '{node_name(view.nodes[index])}' belongs to two quantized layers; "
                                 "nothing was written")
    return sorted(layers, key=lambda layer: layer.node_index)


def _rebuild(model: onnx.ModelProto, layers: list[ReadLayer]
             ) -> tuple[dict[str, QuantizedWeight], dict[str, str], dict[str, np.dtype]]:
    """Put each layer's float node in place of its quantized form and name the placeholder weights; returns
    ``{placeholder: weight}``, ``{bias stand-in: the source's bias name}`` and ``{placeholder: storage dtype of its
    scales and float zeros}``."""
    graph = model.graph
    by_index = {layer.node_index: layer for layer in layers}
    absorbed = {index for layer in layers for index in layer.absorbed}
    replace_nodes(graph, [new for i, node in enumerate(graph.node) if i not in absorbed
                          for new in ([*by_index[i].before, by_index[i].float_node] if i in by_index else [node])])
    bias_names = _stand_in_biases(model)
    remove_unused(model)  # the quantized tensors, DequantizeLinear chains and float-zero terms
    names = NameScope(model)
    renames: dict[str, str] = {}
    weights: dict[str, QuantizedWeight] = {}
    storage: dict[str, np.dtype] = {}
    for layer in layers:
        if layer.weight_name not in renames:
            base = layer.weight_name.removeprefix(PLACEHOLDER).split("\x00")[0]
            renames[layer.weight_name] = name = names.fresh(base)
            weights[name] = layer.qw
            storage[name] = layer.param_dtype
            graph.initializer.append(placeholder(name, layer.dtype, layer.weight_shape))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return weights, bias_names, storage


def _stand_in_biases(model: onnx.ModelProto) -> dict[str, str]:
    """Rename each constant Gemm C read by that Gemm alone to a stand-in while the layers are emitted, so the name an
    emitter gives the bias it folds (``<node>_bias``) is free as in a direct quantization; returns ``{stand-in:
    name}`` (:func:`_restore_names` gives the names back to what is still read)."""
    graph = model.graph
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    gemm_biases = {node.input[2] for node in graph.node if node.op_type == "Gemm" and len(node.input) > 2
                   and readers.get(node.input[2]) == 1 and any(i.startswith(PLACEHOLDER) for i in node.input)}
    outputs = {o.name for o in graph.output}
    stand_ins = {}
    for tensor in graph.initializer:
        if tensor.name in gemm_biases and tensor.name not in outputs:
            stand_ins[f"{BIAS_STAND_IN}{tensor.name}"] = tensor.name
            tensor.name = f"{BIAS_STAND_IN}{tensor.name}"
    for node in graph.node:
        if node.op_type == "Gemm" and len(node.input) > 2 and f"{BIAS_STAND_IN}{node.input[2]}" in stand_ins:
            node.input[2] = f"{BIAS_STAND_IN}{node.input[2]}"
    return stand_ins


def placeholder(name: str, data_type: int, dims: tuple[int, ...]) -> onnx.TensorProto:
    """A data-less initializer of ``name``, type and shape: it tells the targets their weight and is dropped once
    the weight is emitted (as :func:`onnxq.ir.model.copy_model_without` stubs weights)."""
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="onnxq-placeholder")
    return tensor


def _restore_names(model: onnx.ModelProto, stand_ins: dict[str, str]) -> None:
    """Give the bias tensors that are still read their source names back (a fresh one when that name is taken)."""
    if not stand_ins:
        return
    graph = model.graph
    left = {t.name for t in graph.initializer} & set(stand_ins)
    names = NameScope(model)
    final = {stand_in: names.fresh(stand_ins[stand_in]) for stand_in in sorted(left)}
    for tensor in graph.initializer:
        tensor.name = final.get(tensor.name, tensor.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = final.get(name, name)


def _drop_unused_domains(model: onnx.ModelProto) -> None:
    """Remove the com.microsoft and onnxq opset imports when no node uses them any more."""
    used = {node.domain for node in model.graph.node}
    keep = [op for op in model.opset_import if op.domain not in CUSTOM_DOMAINS or op.domain in used]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
