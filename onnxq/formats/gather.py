"""Embedding lookups (Gather of a quantized table ``T[V, H]``) in each output format.

* ``matmulnbits`` and ``onnxq``: ``com.microsoft::GatherBlockQuantized`` (``gather_axis=0``, ``quantize_axis=1``):
  ``Y[i] = s[ids[i], b]·(q[ids[i], h] − zp[ids[i], b])`` with ``b = h // block``; data ``[V, H·c/8]`` uint8 codes
  LSB-first along H in a ``c``-bit container (``c`` ∈ {2, 4, 8}: 3-bit codes in 4 bits; a wider one when ``H·c`` is
  not a whole number of bytes), scales ``[V, ⌈H/block⌉]`` in the output type, uint8 zero points packed along the
  blocks as MatMulNBits packs them.  ORT 1.31's CPU kernel runs 2, 4 and 8 bits, blocks a power of two ≥ 16, and
  a ragged last block; other group sizes fall back to ``qdq`` (a note says so).
* ``qdq``: ``DequantizeLinear`` (blocked along H) feeding the Gather (:func:`onnxq.formats.qdq.emit_qdq`).
* ``fake``: the Gather reads the dequantized table (:func:`onnxq.formats.fake.emit_fake`).

A table that is also the weight of a quantized product (a tied lm_head, same initializer and same ``W[V, H]``)
has one solution; in ``matmulnbits`` its bytes are stored once when the layouts agree: MatMulNBits' B
``[V, H/block, block·c/8]`` is, when ``block`` divides ``H``, byte for byte the lookup's data ``[V, H·c/8]`` (read
through ``Reshape``), and its scales and zero points are the lookup's.  Otherwise the codes are stored twice
(a note says so).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.formats.common import EmitContext, Rewrite, float_dtype, stored_parameter
from onnxq.formats.fake import emit_fake
from onnxq.formats.matmulnbits import MIN_BLOCK, block_size_for, regroup
from onnxq.formats.qdq import emit_qdq
from onnxq.ir.targets import Target
from onnxq.packing import pack_bits
from onnxq.quantized_weight import QuantizedWeight

OP_TYPE = "GatherBlockQuantized"
FUSED_FORMATS = ("matmulnbits", "onnxq")


def lookup_container(bits: int, hidden: int) -> int:
    """Container bits of ``bits``-bit codes in rows of ``hidden`` values: the narrowest of 2, 4, 8 that holds them
    and fills whole bytes (``hidden·c ≡ 0 mod 8``)."""
    for container in (2, 4, 8):
        if container >= bits and hidden * container % 8 == 0:
            return container
    return 8


def fallback_reason(target: Target, group_size: int, ctx: EmitContext) -> str | None:
    """Why the lookup ``target`` is emitted as ``qdq`` instead of GatherBlockQuantized (None: it is not)."""
    if block_size_for(target.matrix_shape[1], group_size) is None:
        return f"group size {group_size} is not a power of two ≥ {MIN_BLOCK} ({OP_TYPE} blocks)"
    return None


def shared_table(ctx: EmitContext, target: Target, block: int, container: int) -> tuple[str, str, str] | None:
    """(B, scales, zero points) of the MatMulNBits that holds this table's bytes (None: none can be shared)."""
    table = ctx.cache.get(("nbits table", target.matrix_key))
    hidden = target.matrix_shape[1]
    if table is None or table["block"] != block or table["bits"] != container or hidden % block:
        return None
    return table["b"], table["scale"], table["zero_point"]


def emit_gather_quantized(target: Target, qw: QuantizedWeight, ctx: EmitContext) -> Rewrite:
    """Replace the Gather by GatherBlockQuantized of the table's codes (see the module docstring)."""
    reason = fallback_reason(target, qw.group_size, ctx)
    if reason:
        ctx.notes.append(f"{target.name}: {reason}; emitted as qdq")
        return emit_qdq(target, qw, ctx)
    rows, hidden = qw.shape
    block = block_size_for(hidden, qw.group_size)
    weight = regroup(qw, block)
    container = lookup_container(qw.bits, hidden)
    before: list[onnx.NodeProto] = []
    key = ("gather table", target.matrix_key)
    if key not in ctx.cache:
        base = target.weight_name
        shared = shared_table(ctx, target, block, container)
        if shared is not None:
            b_name, s_name, zp_name = shared
            shape = ctx.add_initializer(f"{base}_lookup_shape", np.array([rows, -1], dtype=np.int64))
            data = ctx.names.fresh(f"{base}_lookup")
            before.append(ctx.node("Reshape", [b_name, shape], [data], f"{base}_lookup_reshape"))
            ctx.cache[("shared", target.matrix_key)] = True
        else:
            if container != (4 if qw.bits == 3 else qw.bits):
                ctx.notes.append(f"{target.name}: {qw.bits}-bit codes stored in {container}-bit fields (rows of "
                                 f"{hidden} values)")
            data = ctx.add_initializer(f"{base}_lookup", pack_bits(weight.codes, container))
            cast, s_name = stored_parameter(ctx, f"{base}_lookup_scale", weight.scales, float_dtype(target),
                                            ctx.param_dtype(target))
            before += cast
            zp_name = ctx.add_initializer(f"{base}_lookup_zero_point", pack_bits(weight.zero_points, container))
        ctx.cache[key] = (data, s_name, zp_name)
    data, s_name, zp_name = ctx.cache[key]
    node = ctx.node(OP_TYPE, [data, target.node.input[1], s_name, zp_name], [target.node.output[0]],
                    f"{target.name}_{OP_TYPE}", domain="com.microsoft", bits=container, block_size=block,
                    gather_axis=0, quantize_axis=1)
    return Rewrite(before=before, replacement=[node])


def emit_lookup(format_name: str, target: Target, qw: QuantizedWeight, ctx: EmitContext,
                tied: str | None = None) -> Rewrite:
    """The Gather ``target`` in ``format_name``; ``tied``: the quantized product that has the same table, if any
    (its codes are shared when the layouts allow, else the note says they are stored twice)."""
    if format_name in FUSED_FORMATS:
        rewrite = emit_gather_quantized(target, qw, ctx)
    elif format_name == "qdq":
        rewrite = emit_qdq(target, qw, ctx)
    else:
        rewrite = emit_fake(target, qw, ctx)
    if tied is not None:
        if ctx.cache.get(("shared", target.matrix_key)):
            ctx.notes.append(f"{target.name}: one quantized table with '{tied}' (its MatMulNBits codes, scales and "
                             f"zero points, read through Reshape)")
        else:
            ctx.notes.append(f"{target.name}: the table is quantized once with '{tied}' but stored twice (the "
                             f"{format_name} layouts of a lookup and a product differ)")
    return rewrite
