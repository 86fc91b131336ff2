"""GPTQ: round a weight column by column, pushing each column's rounding error onto the columns not yet rounded.

For ``W[N, K]`` and the layer loss ``(w − q) H (w − q)ᵀ`` per row, let ``U`` be the upper Cholesky factor of
``H_d⁻¹`` (damped ``H``, see :mod:`onnxq.solvers.hessian`).  In processing order ``c = 0 … K−1``::

    q_c  = Q(w_c)                       # round column c on its group's grid
    e_c  = (w_c − q_c) / U[c, c]
    w_j ← w_j − e_c · U[c, j]   (j > c) # optimal update of the remaining columns

Updates are applied lazily (exact, not an approximation): immediately within a sub-block of 16 columns, to the rest
of the block once per sub-block, and to the columns after a block of ``block_size`` once per block, each as one
matrix product (``W[:, i2:] −= E · U[i1:i2, i2:]``).  The per-column work inside a sub-block is
:class:`onnxq.solvers.sweeps.GptqSweep` (compiled when built, the same bits as its numpy twin).

Groups are contiguous runs of ``group_size`` columns in the ORIGINAL order (so act-order keeps the storage layout);
a group's scale and zero are fitted (min/max, as RTN) when its first column is reached in processing order, from
the current, error-updated weights of all its columns.  Act-order processes columns by decreasing ``diag H``.
Dequantization: ``w = s·(q − zp) + z`` (see :mod:`onnxq.quantized_weight`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.quantized_weight import SUPPORTED_BITS, QuantizedWeight, num_groups
from onnxq.solvers.grid import ZeroConvention, safe_inverse
from onnxq.solvers.grouping import resolve_group_size
from onnxq.solvers.hessian import PreparedHessian, no_worse_than, prepare_hessian
from onnxq.solvers.rtn import quantize_rtn
from onnxq.solvers.sweeps import GptqSweep

SUB_BLOCK = 16  # columns updated immediately; the rest of a block is updated per sub-block by one product

# fit_group(current_values [N, cols], mask [N, cols] or None) -> (scales, zero_points, float_zeros), each [N]
GroupFitter = Callable[[np.ndarray, "np.ndarray | None"], tuple[np.ndarray, np.ndarray, np.ndarray]]


def quantize_gptq(
    weight: np.ndarray,
    hessian: np.ndarray | PreparedHessian,
    bits: int,
    group_size: int = 64,
    symmetric: bool = False,
    zero_convention: ZeroConvention = "integer",
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    zero_mask: np.ndarray | None = None,
    scale_dtype: np.dtype | type = np.float32,
    rtn_guard: bool = True,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight[N, K]`` given ``H[K, K] = Σ xᵀx``; min/max group grids fitted on updated weights.

    With ``zero_mask`` (bool ``[N, K]``) the masked entries are treated as 0 and get the code ``zp``, so they
    dequantize to exactly 0; the integer zero-point convention is then used whatever ``zero_convention`` says.
    GPTQ is greedy, so with ``rtn_guard`` a row whose loss ``(w − q) H (w − q)ᵀ`` (undamped ``H``) would exceed
    plain RTN's is replaced by the RTN row: the result is never worse than RTN.
    ``scale_dtype``: see :func:`quantize_rtn`.
    """
    weight = check_weight(weight, bits)
    n, k = weight.shape
    group_size = resolve_group_size(k, group_size)
    prepared = prepare_hessian(hessian, damp, act_order=act_order)
    check_hessian_size(prepared, k)
    mask = check_mask(zero_mask, weight.shape)
    if mask is not None:
        zero_convention = "integer"
        weight = np.where(mask, 0.0, weight)

    def fit_group(values: np.ndarray, group_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if group_mask is not None:
            values = np.where(group_mask, 0.0, values)
        rtn = quantize_rtn(values, bits, values.shape[1], symmetric, zero_convention, scale_dtype=scale_dtype)
        float_zeros = rtn.float_zeros[:, 0] if rtn.float_zeros is not None else np.zeros(n)
        return rtn.scales[:, 0], rtn.zero_points[:, 0], float_zeros

    groups = num_groups(k, group_size)
    scales = np.zeros((n, groups))
    zero_points = np.zeros((n, groups))
    float_zeros = np.zeros((n, groups))
    order = prepared.act_order() if act_order else None
    codes, _ = gptq_round(
        weight,
        prepared.inverse_cholesky_upper(order),
        bits,
        group_size,
        scales,
        zero_points,
        float_zeros,
        order=order,
        zero_mask=mask,
        fit_group=fit_group,
        block_size=block_size,
    )
    solved = QuantizedWeight(
        codes=codes,
        scales=scales.astype(np.float32),
        zero_points=zero_points.astype(np.uint8),
        float_zeros=float_zeros.astype(np.float32) if zero_convention == "float" else None,
        bits=bits,
        group_size=group_size,
    )
    if not rtn_guard:
        return solved
    rtn = quantize_rtn(weight, bits, group_size, symmetric, zero_convention, scale_dtype=scale_dtype)
    return no_worse_than(weight, prepared, solved, rtn).weight


def gptq_round(
    weight: np.ndarray,
    upper: np.ndarray,
    bits: int,
    group_size: int,
    scales: np.ndarray,
    zero_points: np.ndarray,
    float_zeros: np.ndarray,
    order: np.ndarray | None = None,
    zero_mask: np.ndarray | None = None,
    fit_group: GroupFitter | None = None,
    block_size: int = 128,
    float32_propagation: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The GPTQ column sweep; returns uint8 codes ``[N, K]`` (original column order) and the loss per row.

    ``upper`` is the upper Cholesky factor of ``H_d⁻¹`` in processing order ``order``.  ``scales``,
    ``zero_points`` and ``float_zeros`` (float64 ``[N, G]``) give each group's grid ``s·(q − zp) + z``; with
    ``fit_group`` they are filled in place when a group's first column is reached.  Masked entries get code ``zp``.
    The loss comes free: ``w − q = e·U`` for the scaled errors ``e``, and ``U H_d Uᵀ = I``, so
    ``(w − q) H_d (w − q)ᵀ = ‖e‖²``.  With ``float32_propagation`` a block's errors reach the later columns
    through a float32 product (``U``'s rows of the block rounded to float32 as they are used, so no ``K × K`` copy;
    the ranking precision of :mod:`onnxq.solvers.hessian`; within a block, float64 as before), and the loss holds
    to that precision.
    """
    n, k = weight.shape
    order = np.arange(k) if order is None else np.asarray(order)
    position_of_column = np.argsort(order)
    group_of_position = order // group_size
    block_size = max(1, int(block_size))
    sub_block = min(SUB_BLOCK, block_size)
    # transposed layout: row c holds processing position c for all N rows (contiguous updates)
    work = np.ascontiguousarray(weight.T[order], dtype=np.float64)
    mask_t = None if zero_mask is None else np.ascontiguousarray(zero_mask.T[order])
    params = _PositionParams(scales, zero_points, float_zeros, group_of_position)
    fitted = None if fit_group is None else np.zeros(scales.shape[1], dtype=bool)
    codes_t = np.empty((k, n), dtype=np.uint8)
    loss = np.zeros(n)
    errors_buffer = np.empty((min(block_size, k), n))  # the current block's scaled errors
    sweep = GptqSweep(work, upper, (params.scales, params.zero_points, params.float_zeros, params.inverse_scales),
                      mask_t, codes_t, errors_buffer, loss, bits)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        errors = errors_buffer[: i2 - i1]
        for j1 in range(i1, i2, sub_block):
            j2 = min(j1 + sub_block, i2)
            c = j1
            while c < j2:
                if fitted is not None and not fitted[group_of_position[c]]:
                    g = group_of_position[c]
                    positions = position_of_column[g * group_size : min((g + 1) * group_size, k)]
                    current = _current_values(work, upper, errors, positions, c, i1, i2, j1, j2)
                    group_mask = None if mask_t is None else mask_t[positions].T
                    scales[:, g], zero_points[:, g], float_zeros[:, g] = fit_group(current.T, group_mask)
                    params.refresh(g)
                    fitted[g] = True
                stop = c + 1  # the columns up to the next group to fit go to one sweep call
                while stop < j2 and (fitted is None or fitted[group_of_position[stop]]):
                    stop += 1
                sweep.columns(i1, c, stop, j2)
                c = stop
            if j2 < i2:
                work[j2:i2] -= upper[j1:j2, j2:i2].T @ errors[j1 - i1 : j2 - i1]
        if i2 < k and not float32_propagation:
            work[i2:] -= upper[i1:i2, i2:].T @ errors
        elif i2 < k:
            work[i2:] -= upper[i1:i2, i2:].astype(np.float32).T @ errors.astype(np.float32)

    codes = np.empty((n, k), dtype=np.uint8)
    codes[:, order] = codes_t.T
    return codes, loss


class _PositionParams:
    """Group parameters laid out per processing position (``[K, N]`` rows) for contiguous access."""

    def __init__(
        self, scales: np.ndarray, zero_points: np.ndarray, float_zeros: np.ndarray, group_of_position: np.ndarray
    ) -> None:
        self._source = (scales, zero_points, float_zeros)
        self._group_of_position = group_of_position
        self.scales = np.ascontiguousarray(scales.T[group_of_position], dtype=np.float64)
        self.zero_points = np.ascontiguousarray(zero_points.T[group_of_position], dtype=np.float64)
        self.float_zeros = np.ascontiguousarray(float_zeros.T[group_of_position], dtype=np.float64)
        self.inverse_scales = safe_inverse(self.scales)

    def refresh(self, group: int) -> None:
        rows = np.flatnonzero(self._group_of_position == group)
        scales, zero_points, float_zeros = self._source
        self.scales[rows] = scales[:, group]
        self.zero_points[rows] = zero_points[:, group]
        self.float_zeros[rows] = float_zeros[:, group]
        self.inverse_scales[rows] = safe_inverse(scales[:, group])


def _current_values(
    work: np.ndarray,
    upper: np.ndarray,
    errors: np.ndarray,
    positions: np.ndarray,
    c: int,
    i1: int,
    i2: int,
    j1: int,
    j2: int,
) -> np.ndarray:
    """Error-updated values ``[len(positions), N]`` at step ``c`` (adds the updates still pending lazily)."""
    current = work[positions]
    in_block = (positions >= j2) & (positions < i2)  # pending: this sub-block's updates
    if np.any(in_block) and c > j1:
        current[in_block] -= upper[j1:c, positions[in_block]].T @ errors[j1 - i1 : c - i1]
    late = positions >= i2  # pending: this block's updates
    if np.any(late) and c > i1:
        current[late] -= upper[i1:c, positions[late]].T @ errors[: c - i1]
    return current


def check_weight(weight: np.ndarray, bits: int) -> np.ndarray:
    if bits not in SUPPORTED_BITS:
        raise OnnxqError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2 or weight.size == 0:
        raise OnnxqError(f"weight must be a non-empty [N, K] matrix, got shape {weight.shape}")
    if not np.all(np.isfinite(weight)):
        raise OnnxqError("weight contains NaN or Inf; the model's initializer is corrupt")
    return weight


def check_hessian_size(prepared: PreparedHessian, k: int) -> None:
    if prepared.size != k:
        raise OnnxqError(f"Hessian is [{prepared.size}, {prepared.size}] but the weight has K = {k} input columns")


def check_mask(zero_mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if zero_mask is None:
        return None
    mask = np.asarray(zero_mask, dtype=bool)
    if mask.shape != shape:
        raise OnnxqError(f"zero_mask must have the weight's shape {shape}, got {mask.shape}")
    return mask
