"""``onnxq`` format: the custom op ``onnxq::MatMulLowBit`` (float zeros carried natively); Conv goes to ``qdq``.

Running the output needs the custom-op library: ``onnxq.custom_ops.session_options()``.  The op takes scales and
zeros in the activation type; stored in float16 for an fp32 model (``--scale-storage float16``) they reach it
through ``Cast(to=FLOAT)`` (the op reads its inputs at every run, so any ORT level works), each tensor only when
every value is a float16 number (storage never changes a weight).  The scales are; the op's zeros ``z − s·zp``
mostly are not (a difference of float16 numbers), so they stay float32 (a solver on that grid is left to do).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.formats.common import EmitContext, Rewrite, float_dtype, stored_parameter
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
    casts: list[onnx.NodeProto] = []

    def build(a_input: str, output: str, weight: QuantizedWeight, bias: str | None) -> onnx.NodeProto:
        key = ("onnxq", target.weight_name, target.orientation, target.through_transpose, alpha)
        if key not in ctx.cache:
            packed, scales, zeros = lowbit_tensors(weight, np.float64)
            base = target.weight_name
            names = [ctx.add_initializer(f"{base}_lowbit", packed)]
            for suffix, values in (("scale", scales), ("zero", zeros)):
                cast, name = stored_parameter(ctx, f"{base}_{suffix}", values, dtype, ctx.param_dtype(target))
                casts.extend(cast)
                names.append(name)
            ctx.cache[key] = tuple(names)
        inputs = [a_input, *ctx.cache[key]] + ([bias] if bias else [])
        return lowbit_node(inputs, output, weight, ctx.names.fresh(f"{target.name}_{OP_TYPE}"))

    rewrite = emit_fused_product(target, qw, ctx, build, carries_float_zeros=True)
    rewrite.before[:0] = casts
    return rewrite
