"""``onnxq`` format: the custom op ``onnxq::MatMulLowBit`` (float zeros carried natively); Conv goes to ``qdq``.

Running the output needs the custom-op library: ``onnxq.custom_ops.session_options()``.
"""

from __future__ import annotations

import onnx

from onnxq.formats.common import EmitContext, Rewrite, float_dtype
from onnxq.formats.lowbit_layout import OP_TYPE, lowbit_node, lowbit_tensors
from onnxq.formats.matmulnbits import emit_fused_product, fused_product_unsupported
from onnxq.formats.qdq import emit_qdq
from onnxq.ir.index import attribute
from onnxq.ir.targets import Target
from onnxq.quantized_weight import QuantizedWeight


def fallback_reason(target: Target, group_size: int, ctx: EmitContext) -> str | None:
    """Why ``target`` is emitted as ``qdq`` instead (None: it is not; every group size is supported)."""
    return fused_product_unsupported(target, ctx, OP_TYPE)


def emit_onnxq(target: Target, qw: QuantizedWeight, ctx: EmitContext) -> Rewrite:
    """Replace MatMul/Gemm by MatMulLowBit ``Y = A·(s·q + z)ᵀ (+ bias)``."""
    reason = fallback_reason(target, qw.group_size, ctx)
    if reason:
        ctx.notes.append(f"{target.name}: {reason}; emitted as qdq")
        return emit_qdq(target, qw, ctx)
    dtype = float_dtype(target)
    alpha = float(attribute(target.node, "alpha", 1.0)) if target.op_type == "Gemm" else 1.0

    def build(a_input: str, output: str, weight: QuantizedWeight, bias: str | None) -> onnx.NodeProto:
        key = ("onnxq", target.weight_name, target.orientation, target.through_transpose, alpha)
        if key not in ctx.cache:
            packed, scales, zeros = lowbit_tensors(weight, dtype)
            base = target.weight_name
            ctx.cache[key] = (ctx.add_initializer(f"{base}_lowbit", packed),
                              ctx.add_initializer(f"{base}_scale", scales),
                              ctx.add_initializer(f"{base}_zero", zeros))
        inputs = [a_input, *ctx.cache[key]] + ([bias] if bias else [])
        return lowbit_node(inputs, output, weight, ctx.names.fresh(f"{target.name}_{OP_TYPE}"))

    return emit_fused_product(target, qw, ctx, build, carries_float_zeros=True)
