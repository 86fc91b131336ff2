"""``fake`` format: the dequantized weight ``s·(q − zp) + z`` stored in float, for accuracy simulation."""

from __future__ import annotations

from onnxq.formats.common import EmitContext, Rewrite, float_dtype, with_input
from onnxq.ir.targets import Target
from onnxq.quantized_weight import QuantizedWeight


def emit_fake(target: Target, qw: QuantizedWeight, ctx: EmitContext) -> Rewrite:
    """Feed the node a float initializer holding the dequantized weight (shared per weight)."""
    dtype = float_dtype(target)
    key = ("fake", target.weight_name, target.orientation, target.through_transpose)
    if key not in ctx.cache:
        values = target.consumed_from_matrix(qw.dequantize(dtype))
        ctx.cache[key] = ctx.add_initializer(f"{target.weight_name}_fakequant", values)
    return Rewrite(replacement=[with_input(target.node, target.input_index, ctx.cache[key])])
