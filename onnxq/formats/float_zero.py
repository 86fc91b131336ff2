"""The exact float-zero term of integer formats: ``A·Z_expᵀ`` from per-group sums of the activation.

Integer formats carry ``s·(q − zp)``; a float zero ``z[N, G]`` (decoupleQ) adds, for a right product
``Y = A·Wᵀ``, ``Σ_k A[..., k]·z[n, g(k)] = Σ_g S[..., g]·z[n, g]`` with the group sums
``S[..., g] = Σ_{k ∈ g} A[..., k]``: the term is ``S·Zᵀ``.  For a left product ``Y = W·X`` it is ``Z·S`` with
``S[..., g, :] = Σ_{k ∈ g} X[..., k, :]``.  Nothing ``[N, K]`` or ``[K, G]`` is stored:

* ``S`` = ReduceSum over the group axis of ``Reshape(A, [..., G, group])`` (``[..., G, group, M]`` for ``X``),
  after a Pad with zeros of K up to ``G·group`` when the last group is shorter (zeros add nothing: exact).  The
  Reshape copies the leading dimensions (``0``), so it needs the activation's rank; when shape inference does not
  know it, ``S = A·E`` with the float group indicator ``E[K, G]`` (``E[k, g] = 1`` iff ``k ∈ g``), the only form
  onnxq 0.1.0 wrote;
* ``S`` is computed once per activation and shared by the layers that read it; ``Z`` is stored as the weight's
  scales are (:func:`~onnxq.formats.common.stored_parameter`).

:mod:`onnxq.formats.read_common` reads both forms back, :mod:`onnxq.quantized_size` counts their tensors.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.formats.common import EmitContext, stored_parameter
from onnxq.ir.model import opset_version
from onnxq.quantized_weight import QuantizedWeight, expand_groups, num_groups

AXES_INPUT_OPSET = 13  # ReduceSum takes its axes as an input from here on (an attribute before)
PADS_INPUT_OPSET = 11  # Pad takes its pads as an input from here on (an attribute before)


def group_indicator(k: int, group_size: int, dtype: np.dtype) -> np.ndarray:
    """``E[K, G]`` with ``E[k, g] = 1`` iff column ``k`` is in group ``g``: ``x·E`` gives per-group sums."""
    return expand_groups(np.eye(num_groups(k, group_size), dtype=dtype), k, group_size).T.copy()


def group_axes(rank: int, left: bool) -> tuple[int, list[int]] | None:
    """``(axis, trailing)``: the activation's K axis (the last; for a left product's ``X`` the one before, unless
    ``X`` is 1-D) and what its Reshape shape ends with after ``[G, group]`` (``[-1]``: ``X``'s columns); None when the
    rank is unknown (0)."""
    if rank < 1:
        return None
    axis = rank - 2 if left and rank > 1 else rank - 1
    return axis, [-1] if axis < rank - 1 else []


def float_zero_correction(
    ctx: EmitContext, activation: str, qw: QuantizedWeight, dtype: np.dtype, left: bool, base: str,
    param_dtype: np.dtype | None = None,
) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing the float-zero term exactly (see the module docstring): ``S·Zᵀ`` (right) or ``Z·S`` (left);
    returns the nodes and the term's name.  ``Z`` is stored as ``param_dtype`` (default ``dtype``) and cast to
    ``dtype``."""
    k = qw.shape[1]
    zeros = qw.float_zeros if left else qw.float_zeros.T.copy()
    nodes, zero_name = stored_parameter(ctx, f"{base}_float_zero", zeros, dtype, param_dtype or dtype)
    sums_key = ("group_sums", activation, k, qw.group_size, dtype.str, left)  # shared by layers reading A
    if sums_key not in ctx.cache:
        sum_nodes, ctx.cache[sums_key] = _group_sums(ctx, activation, k, qw.group_size, dtype, left, base)
        nodes += sum_nodes
    sums = ctx.cache[sums_key]
    out = ctx.names.fresh(f"{base}_zero_term")
    operands = [zero_name, sums] if left else [sums, zero_name]
    nodes.append(ctx.node("MatMul", operands, [out], f"{base}_zero_term"))
    return nodes, out


def _group_sums(ctx: EmitContext, activation: str, k: int, group_size: int, dtype: np.dtype, left: bool,
                base: str) -> tuple[list[onnx.NodeProto], str]:
    """``S``: Pad → Reshape → ReduceSum of ``activation`` (or ``activation·E`` when its rank is unknown)."""
    sums = ctx.names.fresh(f"{base}_group_sums")
    axes = group_axes(ctx.rank(activation), left)
    if axes is None:
        key = ("group_indicator", k, group_size, dtype.str, left)
        if key not in ctx.cache:
            e = group_indicator(k, group_size, dtype)
            ctx.cache[key] = ctx.add_initializer(f"onnxq_group_sum_{k}_{group_size}", e.T.copy() if left else e)
        operands = [ctx.cache[key], activation] if left else [activation, ctx.cache[key]]
        ctx.notes.append(f"{base}: the rank of '{activation}' is unknown; its float-zero term uses a [K, G] group "
                         "indicator")
        return [ctx.node("MatMul", operands, [sums], f"{base}_group_sum")], sums
    axis, trailing = axes
    rank = axis + 1 + len(trailing)
    groups = num_groups(k, group_size)
    opset = opset_version(ctx.model)
    nodes, source = [], activation
    if groups * group_size > k:
        pads = [0] * (2 * rank)
        pads[rank + axis] = groups * group_size - k
        source = ctx.names.fresh(f"{base}_group_padded")
        if opset >= PADS_INPUT_OPSET:
            nodes.append(ctx.node("Pad", [activation, _int64s(ctx, "onnxq_group_pads", pads)], [source],
                                  f"{base}_group_pad"))
        else:
            nodes.append(ctx.node("Pad", [activation], [source], f"{base}_group_pad", pads=pads))
    shape = _int64s(ctx, "onnxq_group_shape", [0] * axis + [groups, group_size] + trailing)
    split = ctx.names.fresh(f"{base}_grouped")
    nodes.append(ctx.node("Reshape", [source, shape], [split], f"{base}_group_reshape"))
    if opset >= AXES_INPUT_OPSET:
        nodes.append(ctx.node("ReduceSum", [split, _int64s(ctx, "onnxq_group_axes", [axis + 1])], [sums],
                              f"{base}_group_sum", keepdims=0))
    else:
        nodes.append(ctx.node("ReduceSum", [split], [sums], f"{base}_group_sum", axes=[axis + 1], keepdims=0))
    return nodes, sums


def _int64s(ctx: EmitContext, base: str, values: list[int]) -> str:
    """A 1-D int64 initializer of ``values``, one per distinct value list in the model."""
    key = ("int64s", tuple(values))
    if key not in ctx.cache:
        ctx.cache[key] = ctx.add_initializer(base, np.array(values, dtype=np.int64))
    return ctx.cache[key]
