"""Reader of ``com.microsoft::GatherBlockQuantized`` lookups (any producer, layout of :mod:`onnxq.formats.gather`).

Data ``[V, H·c/8]`` uint8 codes LSB-first along H in ``c``-bit fields (``c`` = ``bits``), scales ``[V, ⌈H/block⌉]``
(the output type), uint8 zero points packed along the blocks (absent: ``2^(c−1)``); ``gather_axis=0`` and
``quantize_axis`` the last.  ``T[V, H] = W`` with ``w = s·(q − zp)``.  Data read through ``Reshape`` of a
MatMulNBits' B (a table shared with a tied lm_head) comes back as that product's weight: the rebuilt Gather reads
the product's placeholder (through ``Transpose`` when the product is rebuilt as ``MatMul(A, Wᵀ)``), so the two are
emitted again as one table; their dequantized weights must be equal.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxq.formats.read_common import GraphView, ReadLayer, narrowest_bits, refuse, regroup_to
from onnxq.formats.read_fused import PLACEHOLDER, ReadHints, read_matmulnbits
from onnxq.ir.index import attribute, node_name
from onnxq.packing import unpack_bits
from onnxq.quantized_weight import QuantizedWeight


def read_lookup(view: GraphView, index: int, hints: ReadHints) -> ReadLayer:
    """The lookup of the GatherBlockQuantized node at ``index`` (see the module docstring)."""
    node = view.nodes[index]
    bits, block = int(attribute(node, "bits", 4)), int(attribute(node, "block_size", 128))
    reshape = view.produced_by(node.input[0], "Reshape")
    source = view.nodes[reshape].input[0] if reshape is not None else node.input[0]
    data, scales = view.array(source), view.array(node.input[2])
    if data is None or scales is None:
        raise refuse(node, "its data or scales are not initializers")
    if bits not in (2, 4, 8) or block < 16 or int(attribute(node, "gather_axis", 0)) != 0 \
            or int(attribute(node, "quantize_axis", 1)) not in (1, -1) or data.dtype != np.uint8 or data.ndim < 2:
        raise refuse(node, f"unsupported form (bits={bits}, block_size={block}, data {data.dtype} {data.ndim}-D)")
    rows = data.shape[0]
    hidden = data.size // rows * 8 // bits
    blocks = -(-hidden // block)
    if scales.size != rows * blocks:
        raise refuse(node, "data and scales do not have the GatherBlockQuantized layout")
    codes = unpack_bits(data.reshape(rows, -1), bits, hidden)
    zp = view.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if len(node.input) > 3 and node.input[3] and (zp is None or zp.dtype != np.uint8):
        raise refuse(node, "float or non-constant zero points are not supported")
    zero_points = np.full((rows, blocks), 1 << (bits - 1), np.uint8) if zp is None else \
        unpack_bits(zp.reshape(rows, -1), bits, blocks)
    qw = QuantizedWeight(codes, scales.reshape(rows, blocks).astype(np.float32), zero_points, None,
                         narrowest_bits(codes, zero_points, bits, hints.bits), block)
    qw = regroup_to(qw, hints.group_size_for(hidden) or block)
    if reshape is not None:
        return _tied_lookup(view, index, source, qw, reshape, hints)
    base = source.removesuffix("_lookup")
    token = f"{PLACEHOLDER}{base}\x00nk"
    float_node = helper.make_node("Gather", [token, node.input[1]], [node.output[0]], name=_float_name(view, index),
                                  axis=0)
    dtype = onnx.helper.np_dtype_to_tensor_dtype(view.read_type(node.input[2]))
    return ReadLayer(index, float_node, token, (rows, hidden), dtype, qw, param_dtype=np.dtype(scales.dtype))


def _tied_lookup(view: GraphView, index: int, source: str, qw: QuantizedWeight, reshape: int,
                 hints: ReadHints) -> ReadLayer:
    """The lookup whose data is the B of a MatMulNBits (``source``), read as that product's weight."""
    node = view.nodes[index]
    product = next((i for i, n in enumerate(view.nodes) if n.op_type == "MatMulNBits" and len(n.input) > 1
                    and view.stored_name(n.input[1]) == source), None)
    if product is None:
        raise refuse(node, f"its data is a Reshape of '{source}', which no MatMulNBits reads")
    layer = read_matmulnbits(view, product, hints)
    if not np.array_equal(layer.qw.dequantize(np.float64), qw.dequantize(np.float64)):
        raise refuse(node, f"its table differs from the weight of '{node_name(view.nodes[product])}' it shares bytes "
                     "with")
    before = []
    table = layer.weight_name
    if layer.float_node.op_type == "MatMul":  # reads Wᵀ: the lookup reads W back through a Transpose
        table = f"{_float_name(view, index)}_table"
        before.append(helper.make_node("Transpose", [layer.weight_name], [table], name=f"{table}_transpose",
                                       perm=[1, 0]))
    float_node = helper.make_node("Gather", [table, node.input[1]], [node.output[0]], name=_float_name(view, index),
                                  axis=0)
    absorbed = [reshape] if view.only_consumer(node.input[0]) == index else []
    return ReadLayer(index, float_node, layer.weight_name, layer.weight_shape, layer.dtype, layer.qw, absorbed,
                     layer.param_dtype, before)


def _float_name(view: GraphView, index: int) -> str:
    """The rebuilt Gather's name: the lookup's without onnxq's suffix when that name is free."""
    node = view.nodes[index]
    name = node_name(node).removesuffix("_GatherBlockQuantized")
    return name if not any(other.name == name for i, other in enumerate(view.nodes) if i != index) else node_name(node)
