"""``matmulnbits`` format: ``com.microsoft::MatMulNBits`` computing ``Y = A·dequant(B)ᵀ (+ bias)``.

B is ``[N, ceil(K/block), block·bits/8]`` (codes LSB-first along K, K padded with the zero-point
code), scales ``[N, K/block]``, zero points uint8 packed along the blocks.  ORT runs 2/4/8 bits;
3-bit codes go in a 4-bit container.  Float zeros are never given to ORT as float zero points
(that takes a slow path on CPU): the integer part ``s·(q − zp)`` runs in MatMulNBits and the
float part is added exactly by the correction term ``S·Zᵀ`` (group sums ``S`` of A, :mod:`onnxq.formats.float_zero`).
Conv falls back to ``qdq``.

Scales stored in float16 for an fp32 model (``--scale-storage float16``) reach MatMulNBits through
``Cast(to=FLOAT)``: ORT folds it into an initializer at ``ORT_ENABLE_BASIC`` and above, and at ``ORT_DISABLE_ALL``
it runs.  ORT 1.31's int8-activation kernel (accuracy level 4) then computes zeros, since it reads the scales only
when they are a constant initializer at session creation; at level 4 ``B`` is therefore read through an
``Identity``, which makes ORT take its unpacked path (exact fp32 activations, slower) at ``ORT_DISABLE_ALL`` and is
removed, with the Cast folded, at ``ORT_ENABLE_BASIC`` and above, where the fast kernel runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnxq.formats.common import (
    EmitContext,
    Rewrite,
    float_dtype,
    integer_part,
    scaled,
    stored_parameter,
)
from onnxq.formats.float_zero import float_zero_correction
from onnxq.formats.qdq import emit_qdq
from onnxq.ir.index import attribute
from onnxq.ir.targets import Target
from onnxq.packing import pack_bits
from onnxq.quantized_weight import QuantizedWeight

MIN_BLOCK = 16
MAX_BLOCK = 256  # ORT 1.31 refuses larger MatMulNBits blocks
FAST_KERNEL_LEVEL = 4  # the accuracy level whose kernel needs constant scales (see the module docstring)


def block_size_for(k: int, group_size: int) -> int | None:
    """MatMulNBits block size for a solver group size (``None`` if ORT cannot take it)."""
    if group_size >= k:  # per channel: the channel's scale repeated over blocks of ≤ MAX_BLOCK
        return min(MAX_BLOCK, max(MIN_BLOCK, 1 << (k - 1).bit_length()))
    if MIN_BLOCK <= group_size <= MAX_BLOCK and group_size & (group_size - 1) == 0:
        return group_size
    if group_size > MAX_BLOCK and group_size % MAX_BLOCK == 0:
        return MAX_BLOCK
    return None


def regroup(qw: QuantizedWeight, block: int) -> QuantizedWeight:
    """The same weight with parameters repeated so that groups are ``block`` columns (``block`` divides them)."""
    if block == qw.group_size:
        return qw
    k = qw.shape[1]
    groups = -(-k // block)
    repeat = qw.group_size // block if qw.group_size < k else groups

    def expand(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, repeat, axis=1)[:, :groups].copy()

    float_zeros = None if qw.float_zeros is None else expand(qw.float_zeros)
    return QuantizedWeight(qw.codes, expand(qw.scales), expand(qw.zero_points), float_zeros, qw.bits, block)


def pack_matmulnbits(qw: QuantizedWeight, block: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(B ``[N, G, block·bits/8]``, packed zero points ``[N, ceil(G·bits/8)]``, container bits)."""
    bits = 4 if qw.bits == 3 else qw.bits
    n, k = qw.shape
    groups = -(-k // block)
    codes = np.empty((n, groups * block), dtype=np.uint8)
    codes[:, :k] = qw.codes
    codes[:, k:] = qw.zero_points[:, -1:]  # padding dequantizes to 0
    packed = pack_bits(codes.reshape(n, groups, block), bits)
    zero_points = pack_bits(qw.zero_points, bits)
    return packed, zero_points, bits


def fallback_reason(target: Target, group_size: int, ctx: EmitContext) -> str | None:
    """Why ``target`` (quantized with the resolved ``group_size``) is emitted as ``qdq`` instead (None: it is not)."""
    reason = fused_product_unsupported(target, ctx, "MatMulNBits")
    if reason is None and block_size_for(target.matrix_shape[1], group_size) is None:
        reason = f"group size {group_size} is not a power of two ≥ {MIN_BLOCK}"
    return reason


def emit_matmulnbits(target: Target, qw: QuantizedWeight, ctx: EmitContext) -> Rewrite:
    """Replace MatMul/Gemm by MatMulNBits (+ float-zero term, + bias); Conv goes to ``qdq``."""
    block = block_size_for(qw.shape[1], qw.group_size)
    reason = fallback_reason(target, qw.group_size, ctx)
    if reason:
        ctx.notes.append(f"{target.name}: {reason}; emitted as qdq")
        return emit_qdq(target, qw, ctx)
    if qw.bits == 3:
        ctx.notes.append(f"{target.name}: 3-bit codes stored in a 4-bit MatMulNBits container")
    dtype = float_dtype(target)
    alpha = float(attribute(target.node, "alpha", 1.0)) if target.op_type == "Gemm" else 1.0
    casts: list[onnx.NodeProto] = []  # the Cast (and Identity) feeding MatMulNBits, emitted before it

    def build(a_input: str, output: str, weight: QuantizedWeight, bias: str | None) -> onnx.NodeProto:
        weight = regroup(weight, block)
        key = ("matmulnbits", target.weight_name, target.orientation, target.through_transpose, alpha)
        if key not in ctx.cache:
            packed, zero_points, bits = pack_matmulnbits(weight, block)
            base = target.weight_name
            b_name = stored_b = ctx.add_initializer(f"{base}_nbits", packed)
            cast, s_name = stored_parameter(ctx, f"{base}_scale", weight.scales, dtype, ctx.param_dtype(target))
            if cast and ctx.accuracy_level == FAST_KERNEL_LEVEL:
                unpacked = ctx.names.fresh(f"{b_name}_unpacked")
                cast.append(ctx.node("Identity", [b_name], [unpacked], f"{base}_nbits_identity"))
                b_name = unpacked
            casts.extend(cast)
            zp_name = ctx.add_initializer(f"{base}_zero_point", zero_points)
            if alpha == 1.0:  # W's own codes: a lookup of the same table can read them (onnxq.formats.gather)
                ctx.cache[("nbits table", target.matrix_key)] = {"b": stored_b, "scale": s_name, "zero_point": zp_name,
                                                                 "bits": bits, "block": block}
            ctx.cache[key] = (b_name, s_name, zp_name, bits)
        b_name, s_name, zp_name, bits = ctx.cache[key]
        inputs = [a_input, b_name, s_name, zp_name] + (["", bias] if bias else [])
        n, k = weight.shape
        return ctx.node("MatMulNBits", inputs, [output], f"{target.name}_MatMulNBits", domain="com.microsoft",
                        K=k, N=n, bits=bits, block_size=block, accuracy_level=ctx.accuracy_level)

    rewrite = emit_fused_product(target, qw, ctx, build, carries_float_zeros=False)
    rewrite.before[:0] = casts
    return rewrite


def fused_product_unsupported(target: Target, ctx: EmitContext, op_name: str) -> str | None:
    """Why ``target`` cannot become a fused ``Y = A·dequant(W)ᵀ`` op (``None`` if it can)."""
    if target.op_type == "Conv":
        return f"Conv is not supported by {op_name}"
    left = target.op_type == "MatMul" and target.input_index == 0
    if left and ctx.rank(target.node.input[1]) < 2:
        return "constant left operand and the other input's rank is unknown"
    return None


ProductBuilder = Callable[[str, str, QuantizedWeight, "str | None"], onnx.NodeProto]


def emit_fused_product(
    target: Target, qw: QuantizedWeight, ctx: EmitContext, build: ProductBuilder, carries_float_zeros: bool
) -> Rewrite:
    """Replace the target by one fused op ``Y = A·dequant(W)ᵀ (+ bias)`` built by ``build``.

    Handles what every fused op needs around it: Gemm's alpha (folded into scales and zeros),
    beta·C (as the op's bias when constant, else an Add), a constant left operand
    (``Y = W·X ⇔ Yᵀ = Xᵀ·Wᵀ``, two Transposes) and, for ops that cannot carry float zeros,
    the exact correction term ``S·Zᵀ`` (:func:`~onnxq.formats.float_zero.float_zero_correction`).
    """
    node = target.node
    dtype = float_dtype(target)
    left = target.op_type == "MatMul" and target.input_index == 0
    alpha = float(attribute(node, "alpha", 1.0)) if target.op_type == "Gemm" else 1.0
    qw = scaled(qw, alpha)

    before: list[onnx.NodeProto] = []
    activation = node.input[1] if left else node.input[0]
    a_input = activation
    if left:
        rank = ctx.rank(activation)
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        a_input = ctx.names.fresh(f"{activation}_transposed")
        before.append(ctx.node("Transpose", [activation], [a_input], f"{target.name}_transpose_in", perm=perm))

    bias_terms: list[tuple[str, float]] = []  # (C, beta) added after the product
    bias_name = _constant_bias(target, ctx, dtype)
    if bias_name is None and target.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias_terms.append((node.input[2], float(attribute(node, "beta", 1.0))))

    result = ctx.names.fresh(f"{target.name}_product")
    nodes = [build(a_input, result, qw if carries_float_zeros else integer_part(qw), bias_name)]
    if left:
        back = ctx.names.fresh(f"{result}_transposed")
        nodes.append(ctx.node("Transpose", [result], [back], f"{target.name}_transpose_out", perm=perm))
        result = back
    if qw.has_float_zeros and not carries_float_zeros:
        term_nodes, term = float_zero_correction(ctx, activation, qw, dtype, left, target.name,
                                                 ctx.param_dtype(target))
        before += term_nodes
        summed = ctx.names.fresh(f"{target.name}_with_float_zero")
        nodes.append(ctx.node("Add", [result, term], [summed], f"{target.name}_add_float_zero"))
        result = summed
    for c_name, beta in bias_terms:
        if beta != 1.0:
            beta_name = ctx.add_initializer(f"{target.name}_beta", np.array(beta, dtype=dtype))
            scaled_c = ctx.names.fresh(f"{c_name}_times_beta")
            nodes.append(ctx.node("Mul", [c_name, beta_name], [scaled_c], f"{target.name}_beta"))
            c_name = scaled_c
        with_bias = ctx.names.fresh(f"{target.name}_with_bias")
        nodes.append(ctx.node("Add", [result, c_name], [with_bias], f"{target.name}_add_bias"))
        result = with_bias
    nodes[-1].output[0] = node.output[0]
    return Rewrite(before=before, replacement=nodes)


def _constant_bias(target: Target, ctx: EmitContext, dtype: np.dtype) -> str | None:
    """``beta·C`` as a ``[N]`` initializer when Gemm's C is a constant broadcast over rows."""
    node = target.node
    if target.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return None
    tensor = next((t for t in ctx.model.graph.initializer if t.name == node.input[2]), None)
    if tensor is None:
        return None
    values = onnx.numpy_helper.to_array(tensor)
    n = target.matrix_shape[0]
    if values.size not in (1, n) or (values.ndim == 2 and values.shape[0] != 1):
        return None
    beta = float(attribute(node, "beta", 1.0))
    bias = np.broadcast_to(values.reshape(-1), (n,)).astype(np.float64) * beta
    return ctx.add_initializer(f"{target.name}_bias", bias.astype(dtype))
