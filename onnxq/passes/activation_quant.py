"""Per-tensor activation fake-quantization: QuantizeLinear→DequantizeLinear on the activation inputs of layers.

For each activation ``x`` read by a MatMul/Gemm/Conv/MatMulNBits with a constant weight, the range
``[lo, hi] = [min(0, min x), max(0, max x)]`` over the calibration data gives, with ``L = 2^b − 1``,

    s = (hi − lo)/L,   zp = clip(round(−lo/s), 0, L),   x̂ = s·(clip(round(x/s) + zp, 0, L) − zp),

so 0 is exact.  8 bits use uint8; 4 bits use uint4 at opset ≥ 21, else a uint8 container whose input is
first clipped to the 16-level range.  An activation split by SplitQuant (``onnxq.split_activations``
metadata) is fake-quantized per branch, each with its own range, and the layer reads the sum of the
three dequantized branches: three finer grids instead of one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.calibration.data import iter_batches
from onnxq.calibration.sessions import SessionFactory, run_session
from onnxq.errors import OnnxqError
from onnxq.formats.lowbit_layout import OP_TYPE as CUSTOM_OP_TYPE
from onnxq.ir.index import NameScope, element_types, toposort
from onnxq.ir.metadata import ACT_QUANT_METADATA_KEY, set_metadata, split_activations
from onnxq.ir.model import copy_model, opset_version

LAYER_OP_TYPES = ("MatMul", "Gemm", "Conv", "MatMulNBits", CUSTOM_OP_TYPE)  # the fused ones read A first
RESHAPE_OP_TYPES = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")
CONSTANT_OP_TYPES = ("DequantizeLinear", "Transpose", "Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze")


# ----------------------------------------------------------------------------- calibration runs


def run_calibration(
    model: onnx.ModelProto, calibration: object, tensors: Iterable[str]
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{tensor: value}`` for every calibration batch, computed by ONNX Runtime on ``model``."""

    if calibration is None:
        raise OnnxqError("activation ranges need calibration data; pass --calib data.npz")
    tensors = list(dict.fromkeys(tensors))
    inputs = {v.name for v in model.graph.input}
    computed = [t for t in tensors if t not in inputs]
    batches = iter_batches(calibration, model=model)
    factory = SessionFactory(model)
    try:
        session = factory.session(computed) if computed else None
        for origin, batch in batches.with_origin():
            values = run_session(session, computed, batch, origin)
            values.update({t: np.asarray(batch[t]) for t in tensors if t in inputs})
            yield values
    finally:
        factory.close()


def calibrated_ranges(model: onnx.ModelProto, calibration: object, tensors: Iterable[str]) -> dict[str, tuple]:
    """``{tensor: (min, max)}`` over all calibration batches (NaN ignored)."""
    ranges: dict[str, tuple[float, float]] = {}
    for values in run_calibration(model, calibration, tensors):
        for name, value in values.items():
            value = np.asarray(value, dtype=np.float64)
            if not value.size or np.isnan(value).all():
                continue
            lo, hi = float(np.nanmin(value)), float(np.nanmax(value))
            old = ranges.get(name)
            ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return ranges


# ----------------------------------------------------------------------------- quantizer parameters


def quantization_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """``(scale, zero_point)`` of an unsigned ``bits``-bit grid covering ``[min(0, lo), max(0, hi)]``."""
    levels = (1 << bits) - 1
    lo, hi = min(0.0, lo), max(0.0, hi)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise OnnxqError(f"activation range [{lo}, {hi}] is not finite; check the calibration data for inf/NaN")
    if hi - lo <= 0:
        return 1.0, 0
    scale = float(np.float32((hi - lo) / levels))
    zero_point = int(np.clip(np.round(-lo / scale), 0, levels))
    return scale, zero_point


def fake_quantize(x: np.ndarray, scale: float, zero_point: int, bits: int) -> np.ndarray:
    """Numpy reference of QuantizeLinear→DequantizeLinear (round half to even, like ONNX)."""
    levels = (1 << bits) - 1
    q = np.clip(np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zero_point, 0, levels)
    return (np.float32(scale) * (q - zero_point)).astype(np.float32)


# ----------------------------------------------------------------------------- the pass


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers, Constant outputs, and outputs of weight-side nodes (DequantizeLinear, …) fed only constants."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        if node.op_type == "Constant" or (
            node.op_type in CONSTANT_OP_TYPES and all(not i or i in constants for i in node.input)
        ):
            constants.update(node.output)
    return constants


def activation_inputs(model: onnx.ModelProto) -> list[tuple[int, int, str]]:
    """``(node index, input index, tensor)`` of every activation input of a layer with a constant weight.

    MatMul: the one non-constant input (activation × activation products are skipped); Gemm: A when B is
    constant; Conv: X when W is constant; MatMulNBits and onnxq's MatMulLowBit: A.
    """
    constants = constant_tensors(model)
    sites = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in LAYER_OP_TYPES:
            continue
        if node.op_type == "MatMul":
            variable = [i for i, name in enumerate(node.input[:2]) if name not in constants]
            if len(variable) == 1:
                sites.append((index, variable[0], node.input[variable[0]]))
        elif node.op_type in ("MatMulNBits", CUSTOM_OP_TYPE) or node.input[1] in constants:
            if node.input[0] not in constants:
                sites.append((index, 0, node.input[0]))
    return sites


def add_activation_qdq(model: onnx.ModelProto, act_bits: int, calibration: object) -> onnx.ModelProto:
    """A copy of ``model`` whose layer activations are fake-quantized per tensor at ``act_bits`` (8 or 4)."""
    quantized = copy_model(model)
    activation_qdq_in_place(quantized, act_bits, calibration)
    return quantized


def activation_qdq_in_place(model: onnx.ModelProto, act_bits: int, calibration: object) -> None:
    """The activation fake-quantization pass: QuantizeLinear→DequantizeLinear per tensor at ``act_bits`` (8 or 4)
    on every layer activation of ``model``, in place, with ranges calibrated in ORT (recorded in the metadata)."""
    if act_bits not in (4, 8):
        raise OnnxqError(f"--act-bits {act_bits} is not supported; use 8 or 4")
    sites = activation_inputs(model)
    if not sites:
        raise OnnxqError("no layer with a constant weight reads an activation; nothing to fake-quantize")
    splits = {entry["output"]: entry for entry in split_activations(model).values()}
    produced = {o for n in model.graph.node for o in n.output} | {v.name for v in model.graph.input}
    splits = {out: e for out, e in splits.items() if all(b in produced for b in e["branches"])}
    tensors = list(dict.fromkeys(name for _, _, name in sites))
    producers = {o: n for n in model.graph.node for o in n.output}
    sources = {t: _split_source(t, producers, splits) for t in tensors}  # (split activation, reshape chain)
    measured = [b for t in tensors for b in (splits[sources[t][0]]["branches"] if sources[t] else [t])]
    ranges = calibrated_ranges(model, calibration, measured)
    ranges.update({t: (0.0, 0.0) for t in measured if t not in ranges})  # never seen a value: zero range
    dtypes = element_types(model)

    writer = _QdqWriter(model, act_bits, dtypes)
    replacement: dict[str, str] = {}  # activation → the tensor layers read instead
    record: dict[str, dict] = {}
    for tensor in tensors:
        if sources[tensor]:
            source, chain = sources[tensor]
            branch_names = splits[source]["branches"]
            total = writer.sum([writer.fake_quantize(b, *ranges[b]) for b in branch_names], source)
            replacement[tensor] = writer.replay(chain, total)
            record[tensor] = {"branches": {b: list(ranges[b]) for b in branch_names}, "split_activation": source}
        else:
            replacement[tensor] = writer.fake_quantize(tensor, *ranges[tensor])
            record[tensor] = {"range": list(ranges[tensor])}
        record[tensor]["read_as"] = replacement[tensor]

    nodes = list(model.graph.node)
    for index, input_index, tensor in sites:
        nodes[index].input[input_index] = replacement[tensor]
    model.graph.node.extend(writer.nodes)
    toposort(model)
    set_metadata(model, ACT_QUANT_METADATA_KEY, json.dumps({"bits": act_bits, "tensors": record}, sort_keys=True))


def _split_source(
    tensor: str, producers: Mapping[str, onnx.NodeProto], splits: Mapping[str, dict]
) -> tuple[str, list[onnx.NodeProto]] | None:
    """The split activation ``tensor`` is, up to a chain of reshaping ops (per-tensor QDQ commutes with them)."""
    chain: list[onnx.NodeProto] = []
    while tensor not in splits:
        node = producers.get(tensor)
        if node is None or node.op_type not in RESHAPE_OP_TYPES:
            return None
        chain.append(node)
        tensor = node.input[0]
    return tensor, chain[::-1]


class _QdqWriter:
    """Builds Q→DQ node chains (and branch sums) with fresh names; nodes are placed later."""

    def __init__(self, model: onnx.ModelProto, bits: int, dtypes: Mapping[str, int]) -> None:
        self.model = model
        self.bits = bits
        self.dtypes = dtypes
        self.names = NameScope(model)
        self.opset = opset_version(model)
        self.uses_uint4 = bits == 4 and self.opset >= 21
        self.nodes: list[onnx.NodeProto] = []

    def _constant(self, base: str, value: np.ndarray) -> str:
        name = self.names.fresh(base)
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def fake_quantize(self, tensor: str, lo: float, hi: float) -> str:
        scale, zero_point = quantization_params(lo, hi, self.bits)
        elem = self.dtypes.get(tensor, onnx.TensorProto.FLOAT)
        float_type = helper.tensor_dtype_to_np_dtype(elem)
        if elem != onnx.TensorProto.FLOAT and self.opset < 19:
            raise OnnxqError(f"activation '{tensor}' is not float32; per-tensor QDQ of float16 needs opset 19+")
        base = tensor.replace("/", "_").strip("_")
        scale_name = self._constant(f"{base}_act_scale", np.array(scale, dtype=float_type))
        if self.uses_uint4:
            zp_tensor = helper.make_tensor(self.names.fresh(f"{base}_act_zero_point"), onnx.TensorProto.UINT4, [],
                                           [zero_point])
            self.model.graph.initializer.append(zp_tensor)
            zp_name = zp_tensor.name
        else:
            zp_name = self._constant(f"{base}_act_zero_point", np.array(zero_point, dtype=np.uint8))
        nodes = []
        source = tensor
        if self.bits == 4 and not self.uses_uint4:  # 16 levels in a uint8 container: clip to the grid first
            lo_name = self._constant(f"{base}_act_min", np.array(scale * (0 - zero_point), dtype=float_type))
            hi_name = self._constant(f"{base}_act_max", np.array(scale * (15 - zero_point), dtype=float_type))
            clipped = self.names.fresh(f"{base}_act_clipped")
            nodes.append(helper.make_node("Clip", [tensor, lo_name, hi_name], [clipped],
                                          name=self.names.fresh(f"{base}_act_clip")))
            source = clipped
        quantized = self.names.fresh(f"{base}_act_q")
        dequantized = self.names.fresh(f"{base}_act_dq")
        nodes.append(helper.make_node("QuantizeLinear", [source, scale_name, zp_name], [quantized],
                                      name=self.names.fresh(f"{base}_act_quantize")))
        nodes.append(helper.make_node("DequantizeLinear", [quantized, scale_name, zp_name], [dequantized],
                                      name=self.names.fresh(f"{base}_act_dequantize")))
        self.nodes.extend(nodes)
        return dequantized

    def replay(self, chain: list[onnx.NodeProto], tensor: str) -> str:
        """Copies of the reshaping ``chain`` applied to ``tensor`` (its first input replaced); returns the result."""
        for node in chain:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = self.names.fresh(f"{node.name or node.op_type}_act_dq")
            copy.input[0] = tensor
            tensor = self.names.fresh(f"{node.output[0]}_act_dq")
            del copy.output[:]
            copy.output.append(tensor)
            self.nodes.append(copy)
        return tensor

    def sum(self, parts: list[str], tensor: str) -> str:
        base = tensor.replace("/", "_").strip("_")
        total = parts[0]
        nodes = []
        for part in parts[1:]:
            out = self.names.fresh(f"{base}_act_dq_sum")
            nodes.append(helper.make_node("Add", [total, part], [out], name=self.names.fresh(f"{base}_act_dq_add")))
            total = out
        self.nodes.extend(nodes)
        return total
