"""Reader of weights given as ``DequantizeLinear`` of constant codes feeding MatMul, Gemm, Conv or Gather (a table).

``DequantizeLinear(q, s, zp)`` is ``s·(q − zp)`` blocked (``block_size``) along the reduction axis, per output
channel (1-D scale on the other axis) or per tensor; signed codes are read as unsigned ``q + 2^(b−1)`` with
``zp + 2^(b−1)`` (the same values).  onnxq's float zeros come back from its forms (:mod:`onnxq.formats.qdq`):
for Conv a second DequantizeLinear added before the Reshape, of ``ConstantOfShape`` ones with scale ``z`` (or, as
onnxq 0.1.0 wrote it, of stored zero codes with zero point 1 and scale ``−z``); for MatMul/Gemm the term ``S·Zᵀ``
added to the product (``Z`` holds Gemm's ``alpha·z``; :func:`~onnxq.formats.read_common.find_float_zero_term`).
A DequantizeLinear whose output feeds anything else is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.formats.read_common import GraphView, ReadLayer, find_float_zero_term, narrowest_bits, refuse
from onnxq.formats.read_fused import PLACEHOLDER, ReadHints
from onnxq.ir.index import attribute
from onnxq.quantized_weight import QuantizedWeight

CONTAINERS = {
    onnx.TensorProto.UINT2: (2, False), onnx.TensorProto.INT2: (2, True),
    onnx.TensorProto.UINT4: (4, False), onnx.TensorProto.INT4: (4, True),
    onnx.TensorProto.UINT8: (8, False), onnx.TensorProto.INT8: (8, True),
}


def weight_dequantize_nodes(view: GraphView) -> list[int]:
    """DequantizeLinear nodes of constant integer codes, other than onnxq's float-zero ones (read with their
    partner)."""
    found = []
    for index, node in enumerate(view.nodes):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        codes = view.inits.get(node.input[0])
        if codes is None or codes.data_type not in CONTAINERS or _is_float_zero_half(view, index):
            continue
        found.append(index)
    return found


def _is_float_zero_half(view: GraphView, index: int) -> bool:
    """Whether the DequantizeLinear at ``index`` is the second input of an Add (onnxq's Conv float zeros)."""
    add = view.only_consumer(view.nodes[index].output[0])
    return add is not None and view.nodes[add].op_type == "Add" and view.nodes[add].input[1] == \
        view.nodes[index].output[0] and view.produced_by(view.nodes[add].input[0], "DequantizeLinear") is not None


def read_qdq_layers(view: GraphView, index: int, hints: ReadHints) -> list[ReadLayer]:
    """One layer per MatMul/Gemm/Conv/Gather reading the weight dequantized at ``index`` (none when the weight feeds
    anything else: that DequantizeLinear stays)."""
    dq = view.nodes[index]
    weight = dq.output[0]
    conv_zeros = None
    conv_shape: tuple[int, ...] | None = None
    add = view.only_consumer(weight)
    if add is not None and view.nodes[add].op_type == "Add" and view.nodes[add].input[0] == weight:
        partner = view.produced_by(view.nodes[add].input[1], "DequantizeLinear")
        if partner is None:
            return []
        conv_zeros = _float_zero_half(view, partner, dq)
        weight = view.nodes[add].output[0]
    reshape = view.only_consumer(weight)
    if reshape is not None and view.nodes[reshape].op_type == "Reshape":
        shape = view.array(view.nodes[reshape].input[1])
        if shape is None or np.any(shape <= 0):
            return []
        conv_shape, weight = tuple(int(d) for d in shape), view.nodes[reshape].output[0]
    elif conv_zeros is not None:
        return []
    readers = view.consumers.get(weight, [])
    if not readers or weight in view.outputs:
        return []
    layers = []
    for reader in readers:
        layer = _layer(view, reader, weight, dq, conv_shape, conv_zeros, hints)
        if layer is None:
            return []
        layers.append(layer)
    return layers


def _float_zero_half(view: GraphView, index: int, weight_dq: onnx.NodeProto) -> np.ndarray:
    """``z`` (as stored) from the DequantizeLinear at ``index``, blocked like the weight's ``weight_dq``: of
    ``ConstantOfShape`` uint8 ones with scale ``z`` and no zero point, or of zero codes with zero point 1 and scale
    ``−z`` (onnxq 0.1.0)."""
    node = view.nodes[index]
    codes_dims = tuple(int(d) for d in view.inits[weight_dq.input[0]].dims)
    scales = view.array(node.input[1])
    zero_points = view.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    same_blocks = all(attribute(node, key, None) == attribute(weight_dq, key, None) for key in ("axis", "block_size"))
    ones = view.produced_by(node.input[0], "ConstantOfShape")
    if ones is not None and scales is not None and same_blocks and (len(node.input) < 3 or not node.input[2]):
        shape, value = view.array(view.nodes[ones].input[0]), attribute(view.nodes[ones], "value", None)
        if shape is not None and tuple(int(d) for d in shape) == codes_dims and value is not None and \
                value.data_type == onnx.TensorProto.UINT8 and numpy_helper.to_array(value).tolist() == [1]:
            return scales
    codes = view.array(node.input[0])
    if codes is None or scales is None or zero_points is None or not same_blocks or codes.shape != codes_dims \
            or np.any(codes.astype(np.int64) != 0) or np.any(zero_points.astype(np.int64) != 1):
        raise refuse(weight_dq, "the weight's float-zero DequantizeLinear is not onnxq's")
    return -scales


def _layer(view: GraphView, reader: int, weight: str, dq: onnx.NodeProto, conv_shape: tuple[int, ...] | None,
           conv_zeros: np.ndarray | None, hints: ReadHints) -> ReadLayer | None:
    """The layer of the node at ``reader`` reading ``weight`` (None: it is not a MatMul/Gemm/Conv weight or a Gather
    table)."""
    node = view.nodes[reader]
    if node.domain not in ("", "ai.onnx"):
        return None
    slot = list(node.input).index(weight)
    if node.op_type == "Conv" and slot == 1 and conv_shape is not None and len(conv_shape) in (3, 4):
        k_axis = 1
    elif conv_shape is not None or conv_zeros is not None:
        return None
    elif node.op_type == "MatMul" and slot in (0, 1) and node.input[0] != node.input[1]:
        k_axis = 1 - slot
    elif node.op_type == "Gemm" and slot == 1 and not attribute(node, "transA", 0):
        k_axis = 1 if attribute(node, "transB", 0) else 0
    elif node.op_type == "Gather" and slot == 0 and attribute(node, "axis", 0) in (0, -2):
        k_axis = 1  # a lookup table T[V, H] is W
    else:
        return None
    qw = _matrix(view, dq, k_axis, hints)
    if qw is None:
        return None
    absorbed = []
    stored = [view.array(dq.input[1]).dtype]
    float_node = onnx.NodeProto()
    float_node.CopyFrom(node)
    if conv_zeros is not None:
        if conv_zeros.shape != qw.scales.shape:
            raise refuse(node, "its float-zero DequantizeLinear does not match its weight's blocks")
        qw = QuantizedWeight(qw.codes, qw.scales, qw.zero_points, conv_zeros.astype(np.float32), qw.bits,
                             qw.group_size)
        stored.append(conv_zeros.dtype)
    elif node.op_type in ("MatMul", "Gemm"):
        left = node.op_type == "MatMul" and slot == 0
        term = find_float_zero_term(view, node.output[0], node.input[1 - slot if node.op_type == "MatMul" else 0],
                                    qw.shape[1], qw.shape[0], left)
        if term is not None:
            alpha = float(attribute(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
            zeros = (term.float_zeros.astype(np.float64) / alpha).astype(np.float32)
            if term.group_size != qw.group_size or not np.array_equal(
                    (zeros.astype(np.float64) * alpha).astype(term.float_zeros.dtype), term.float_zeros):
                raise refuse(node, "its float-zero term does not match its DequantizeLinear weight")
            qw = QuantizedWeight(qw.codes, qw.scales, qw.zero_points, zeros, qw.bits, qw.group_size)
            float_node.output[0] = term.output
            absorbed = term.nodes
            stored.append(term.float_zeros.dtype)
    base = dq.input[0].removesuffix("_quant")
    float_node.input[slot] = f"{PLACEHOLDER}{base}\x00{'conv' if conv_shape else ('nk' if k_axis == 1 else 'kn')}"
    shape = conv_shape or tuple(int(d) for d in view.inits[dq.input[0]].dims)
    dtype = onnx.helper.np_dtype_to_tensor_dtype(view.read_type(dq.input[1]))
    param_dtype = np.dtype(np.float16 if np.dtype(np.float16) in stored else np.float32)
    return ReadLayer(reader, float_node, float_node.input[slot], shape, dtype, qw, absorbed, param_dtype)


def _matrix(view: GraphView, dq: onnx.NodeProto, k_axis: int, hints: ReadHints) -> QuantizedWeight | None:
    """``W[N, K]`` of the DequantizeLinear ``dq`` whose K axis is ``k_axis`` of its 2-D output (None: not a
    blocked, per-channel or per-tensor 2-D dequantization)."""
    codes_tensor = view.inits[dq.input[0]]
    container, signed = CONTAINERS[codes_tensor.data_type]
    codes, scales = view.array(dq.input[0]), view.array(dq.input[1])
    zero_points = view.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if codes is None or scales is None or codes.ndim != 2 or (len(dq.input) > 2 and dq.input[2]
                                                              and zero_points is None):
        return None
    if zero_points is None:
        zero_points = np.zeros(scales.shape, dtype=np.int64)
    offset = 1 << (container - 1) if signed else 0
    codes = codes.astype(np.int64) + offset
    zero_points = zero_points.astype(np.int64) + offset
    axis = int(attribute(dq, "axis", 1)) % 2
    block = int(attribute(dq, "block_size", 0))
    k = codes.shape[k_axis]
    if block > 0 and axis == k_axis and scales.ndim == 2:
        group_size = block
    elif block == 0 and scales.ndim == 1 and axis != k_axis:
        group_size, scales, zero_points = k, scales[:, None] if k_axis == 1 else scales[None, :], \
            (zero_points[:, None] if k_axis == 1 else zero_points[None, :])
    elif block == 0 and scales.ndim == 0:
        n = codes.shape[1 - k_axis]
        group_size = k
        scales = np.full((n, 1) if k_axis == 1 else (1, n), scales)
        zero_points = np.full(scales.shape, zero_points)
    else:
        return None
    if k_axis == 0:
        codes, scales, zero_points = codes.T, scales.T, zero_points.T
    if scales.dtype not in (np.float32, np.float16) or zero_points.shape != scales.shape:
        return None
    bits = narrowest_bits(codes, zero_points, container, hints.bits)
    return QuantizedWeight(np.ascontiguousarray(codes, dtype=np.uint8), np.ascontiguousarray(scales, np.float32),
                           np.ascontiguousarray(zero_points, dtype=np.uint8), None, bits, group_size)
