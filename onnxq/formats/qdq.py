"""``qdq`` format: standard ONNX ``DequantizeLinear`` (blocked, opset 21/25) feeding the original op.

``DequantizeLinear(q, s, zp)`` computes ``s·(q − zp)`` per block of ``group_size`` along the
reduction axis.  A float zero ``z`` (decoupleQ) is added exactly: for MatMul/Gemm by the
correction term ``S·Zᵀ`` (group sums ``S`` of the activation, :mod:`onnxq.formats.float_zero`), for Conv to the
weight by a second ``DequantizeLinear`` of ones made at run time (``ConstantOfShape``) with scale ``z`` blocked
like the weight and no zero point, which yields ``(1 − 0)·z = z`` per column: only ``z[N, G]`` is stored.
(onnxq 0.1.0 stored all-zero codes ``[N, K]`` with zero point 1 and scale ``−z`` instead; both are read back.)
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.formats.common import (
    EmitContext,
    Rewrite,
    float_dtype,
    scaled,
    stored_parameter,
    with_input,
)
from onnxq.formats.float_zero import float_zero_correction
from onnxq.ir.index import attribute
from onnxq.ir.targets import Target
from onnxq.packing import pack_bits
from onnxq.quantized_weight import QuantizedWeight

UINT2_OPSET = 25  # first opset whose DequantizeLinear takes uint2
BLOCKED_OPSET = 21  # first opset with blocked DequantizeLinear and uint4


def required_opset(bits: int) -> int:
    """Lowest default-domain opset the qdq format needs for ``bits``."""
    return UINT2_OPSET if bits == 2 else BLOCKED_OPSET


def container(bits: int, row_length: int) -> tuple[int, int]:
    """(ONNX element type, container bits) holding ``bits``-bit codes.

    3-bit codes live in uint4.  2-bit codes live in uint2, except when the packed rows are not
    a multiple of 4 long: ORT 1.31 fuses DequantizeLinear→MatMul into MatMulNBits under
    ORT_ENABLE_ALL and then computes such uint2 weights wrongly, so they go to uint4.
    """
    if bits == 2 and row_length % 4 == 0:
        return onnx.TensorProto.UINT2, 2
    if bits <= 4:
        return onnx.TensorProto.UINT4, 4
    return onnx.TensorProto.UINT8, 8


def _packed_tensor(ctx: EmitContext, base: str, values: np.ndarray, data_type: int, container_bits: int) -> str:
    flat = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    raw = flat.tobytes() if container_bits == 8 else pack_bits(flat, container_bits).tobytes()
    return ctx.add_raw_initializer(base, data_type, values.shape, raw)


def dequantize_nodes(
    ctx: EmitContext, qw: QuantizedWeight, base: str, dtype: np.dtype, transpose: bool,
    param_dtype: np.dtype | None = None,
) -> tuple[list[onnx.NodeProto], str]:
    """DequantizeLinear of ``W`` (``transpose``: of ``Wᵀ``), blocked along K; returns nodes and output.  Scales
    stored as ``param_dtype`` (float16 in a compact fp32 model) are cast to ``dtype`` first, so DequantizeLinear
    computes ``s·(q − zp)`` in ``dtype`` from the stored ``s`` as for float32 scales (ORT folds the Cast at
    ``ORT_ENABLE_BASIC`` and above)."""
    codes, scales, zero_points = qw.codes, qw.scales, qw.zero_points
    axis = 1
    if transpose:
        codes, scales, zero_points, axis = codes.T, scales.T, zero_points.T, 0
    data_type, bits = container(qw.bits, codes.shape[-1])
    if qw.bits == 2 and bits != 2:
        ctx.notes.append(f"{base}: 2-bit codes stored as uint4 (row length {codes.shape[-1]} is not a multiple of 4)")
    q_name = _packed_tensor(ctx, f"{base}_quant", codes, data_type, bits)
    cast, s_name = stored_parameter(ctx, f"{base}_scale", scales, dtype, param_dtype or dtype)
    zp_name = _packed_tensor(ctx, f"{base}_zero_point", zero_points, data_type, bits)
    out = ctx.names.fresh(f"{base}_dequant")
    node = ctx.node("DequantizeLinear", [q_name, s_name, zp_name], [out], f"{base}_DequantizeLinear", axis=axis,
                    block_size=qw.group_size)
    return [*cast, node], out


def _float_zero_nodes(ctx: EmitContext, qw: QuantizedWeight, base: str, dtype: np.dtype,
                      param_dtype: np.dtype) -> tuple[list[onnx.NodeProto], str]:
    """``Z_exp[N, K]`` at run time: DequantizeLinear of ``ConstantOfShape([N, K], uint8 1)`` with scale ``z[N, G]``
    (stored as the weight's scales) blocked along K, no zero point: ``(1 − 0)·z = z``, exact."""
    shape = ctx.add_initializer(f"{base}_float_zero_shape", np.array(qw.shape, dtype=np.int64))
    ones = ctx.names.fresh(f"{base}_float_zero_ones")
    fill = ctx.node("ConstantOfShape", [shape], [ones], f"{base}_float_zero_ones",
                    value=onnx.helper.make_tensor("value", onnx.TensorProto.UINT8, [1], [1]))
    cast, z_name = stored_parameter(ctx, f"{base}_float_zero", qw.float_zeros, dtype, param_dtype)
    out = ctx.names.fresh(f"{base}_float_zero_dequant")
    node = ctx.node("DequantizeLinear", [ones, z_name], [out], f"{base}_float_zero_DequantizeLinear", axis=1,
                    block_size=qw.group_size)
    return [fill, *cast, node], out


def emit_qdq(target: Target, qw: QuantizedWeight, ctx: EmitContext) -> Rewrite:
    """Replace the node's weight input by DequantizeLinear of the codes (shared per weight)."""
    dtype = float_dtype(target)
    param_dtype = ctx.param_dtype(target)
    base = target.weight_name
    rewrite = Rewrite()
    key = ("qdq", target.weight_name, target.orientation, target.through_transpose)
    if key not in ctx.cache:
        if target.orientation == "conv":
            nodes, flat = dequantize_nodes(ctx, qw, base, dtype, transpose=False, param_dtype=param_dtype)
            if qw.has_float_zeros:
                float_zero_nodes, float_zeros = _float_zero_nodes(ctx, qw, base, dtype, param_dtype)
                summed = ctx.names.fresh(f"{base}_dequant_sum")
                nodes += float_zero_nodes + [ctx.node("Add", [flat, float_zeros], [summed], f"{base}_add_float_zero")]
                flat = summed
            shape = ctx.add_initializer(f"{base}_shape", np.array(target.weight_shape, dtype=np.int64))
            out = ctx.names.fresh(f"{base}_dequant_{len(target.weight_shape)}d")
            nodes.append(ctx.node("Reshape", [flat, shape], [out], f"{base}_reshape"))
        else:
            nodes, out = dequantize_nodes(ctx, qw, base, dtype, transpose=target.orientation == "kn",
                                          param_dtype=param_dtype)
        rewrite.before.extend(nodes)
        ctx.cache[key] = out
    node = with_input(target.node, target.input_index, ctx.cache[key])
    rewrite.replacement = [node]
    if target.orientation != "conv" and qw.has_float_zeros:
        rewrite.before, rewrite.replacement = _add_float_zero_term(ctx, target, node, qw, dtype, rewrite.before)
    return rewrite


def _add_float_zero_term(
    ctx: EmitContext, target: Target, node: onnx.NodeProto, qw: QuantizedWeight, dtype: np.dtype,
    before: list[onnx.NodeProto],
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """Rename the output of ``node`` (the target's replacement) and add the exact float-zero correction term."""
    left = target.op_type == "MatMul" and target.input_index == 0
    activation = node.input[1] if left else node.input[0]
    alpha = float(attribute(node, "alpha", 1.0)) if target.op_type == "Gemm" else 1.0
    nodes, term = float_zero_correction(ctx, activation, scaled(qw, alpha), dtype, left, target.name,
                                        ctx.param_dtype(target))
    output = node.output[0]
    partial = ctx.names.fresh(f"{output}_without_float_zero")
    node.output[0] = partial
    add = ctx.node("Add", [partial, term], [output], f"{target.name}_add_float_zero")
    return before + nodes, [node, add]
