"""Integer steps on a fixed grid: choose codes ``c`` so that ``q = s·(c − zp) + z`` minimises ``(w − q) H (w − q)ᵀ``.

The grid of each row is given per group (``scales``, ``zero_points``, ``float_zeros``: float64 ``[N, G]``); codes live
in ``[0, 2^b − 1]``; entries under ``zero_mask`` keep the code ``zp`` (they dequantize to exactly 0).

* :func:`coordinate_descent` — exact minimisation over one code at a time.  With ``e = q − w`` and ``g = e·H``,
  moving ``q_k`` by ``d`` changes the loss by ``2·d·g_k + d²·H_kk``; the best grid point is the one nearest to
  ``q_k − g_k/H_kk``, so every move lowers the loss.  Within a block of columns ``g`` follows each move at once
  (:func:`onnxq.solvers.sweeps.cd_block`, compiled), the columns outside it once per block (one matrix product;
  in the last sweep only the columns after the block, the only ones it still reads).
* :func:`relaxed_rounding` — projected gradient descent (FISTA, step ``1/λ_max(H)``) on the box-relaxed
  ``q ∈ [s·(0 − zp) + z, s·(2^b − 1 − zp) + z]``, rounding the columns progressively in stages and re-optimising
  the columns still free after each stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from onnxq.quantized_weight import expand_groups
from onnxq.solvers.grid import nearest_codes, safe_inverse
from onnxq.solvers.sweeps import cd_block


@dataclass
class GroupGrid:
    """Codes ``[N, K]`` (uint8) and float64 group parameters ``[N, G]`` of one weight: ``q = s·(c − zp) + z``."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    float_zeros: np.ndarray

    def take(self, rows: np.ndarray | slice, other: GroupGrid, source_rows: np.ndarray | slice | None = None) -> None:
        """Copy ``other``'s rows ``source_rows`` (default: the same ``rows``, e.g. a bool mask) into ``rows``."""
        source_rows = rows if source_rows is None else source_rows
        for name in ("codes", "scales", "zero_points", "float_zeros"):
            getattr(self, name)[rows] = getattr(other, name)[source_rows]

    def rows(self, index: np.ndarray) -> GroupGrid:
        """A copy of the rows ``index``."""
        return GroupGrid(self.codes[index], self.scales[index], self.zero_points[index], self.float_zeros[index])

    def with_codes(self, codes: np.ndarray) -> GroupGrid:
        return GroupGrid(codes, self.scales.copy(), self.zero_points.copy(), self.float_zeros.copy())

    def expanded(self, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(s, zp, z)`` repeated to ``[N, K]``."""
        k = self.codes.shape[1]
        return (
            expand_groups(self.scales, k, group_size),
            expand_groups(self.zero_points, k, group_size),
            expand_groups(self.float_zeros, k, group_size),
        )

    def dequantize(self, group_size: int) -> np.ndarray:
        scales, zero_points, float_zeros = self.expanded(group_size)
        return scales * (self.codes - zero_points) + float_zeros


def coordinate_descent(
    target: np.ndarray,
    hessian: np.ndarray,
    grid: GroupGrid,
    group_size: int,
    bits: int,
    zero_mask: np.ndarray | None = None,
    sweeps: int = 1,
    block_size: int = 128,
    hessian32: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sweeps of exact one-code-at-a-time minimisation from ``grid.codes``; returns new codes and the loss change.

    The loss change per row (``≤ 0``) is accumulated from the exact quadratic increments.  With ``hessian32``
    (``H`` in float32) the gradient's ``K × K`` products (its start and each block's update of the other columns)
    run in float32, so moves and change are those of the ranking loss (:func:`onnxq.solvers.hessian.ranking_loss`).
    """
    n, k = target.shape
    scales, zero_points, float_zeros = (np.ascontiguousarray(a.T) for a in grid.expanded(group_size))
    inverse_scales = safe_inverse(scales)
    mask_t = None if zero_mask is None else np.ascontiguousarray(zero_mask.T)
    codes_t = np.ascontiguousarray(grid.codes.T, dtype=np.float64)
    values_t = scales * (codes_t - zero_points) + float_zeros  # q, [K, n]
    products = hessian if hessian32 is None else hessian32
    # (e·H)ᵀ = H·eᵀ, [K, n]
    gradient_t = (products @ (values_t - target.T).astype(products.dtype, copy=False)).astype(np.float64, copy=False)
    diag = np.diag(hessian).copy()
    change = np.zeros(n)
    sweeps = max(1, int(sweeps))
    for sweep in range(sweeps):
        last = sweep + 1 == sweeps  # the last sweep never reads a passed column's gradient again
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            moves = np.zeros((i2 - i1, n))
            block = slice(i1, i2)
            cd_block(gradient_t[block].copy(), hessian, i1, values_t[block], codes_t[block],
                     (scales[block], zero_points[block], float_zeros[block], inverse_scales[block]),
                     None if mask_t is None else mask_t[block], diag[block], moves, change, bits)
            rest = slice(i2 if last else 0, k)
            gradient_t[rest] += products[rest, i1:i2] @ moves.astype(products.dtype, copy=False)
    return np.ascontiguousarray(codes_t.T).astype(np.uint8), change


def relaxed_rounding(
    target: np.ndarray,
    hessian: np.ndarray,
    grid: GroupGrid,
    group_size: int,
    bits: int,
    zero_mask: np.ndarray | None = None,
    order: np.ndarray | None = None,
    stages: int = 8,
    steps: int = 25,
) -> np.ndarray:
    """Projected gradient (FISTA) on the box-relaxed weights, rounding the columns progressively in stages."""
    n, k = target.shape
    levels = (1 << bits) - 1
    scales, zero_points, float_zeros = grid.expanded(group_size)
    low = scales * (0 - zero_points) + float_zeros
    high = scales * (levels - zero_points) + float_zeros
    low, high = np.minimum(low, high), np.maximum(low, high)
    if zero_mask is not None:
        low = np.where(zero_mask, 0.0, low)
        high = np.where(zero_mask, 0.0, high)
    relaxed = np.clip(target, low, high)
    step = 1.0 / scipy.linalg.eigvalsh(hessian, subset_by_index=[k - 1, k - 1])[0]
    order = np.arange(k) if order is None else np.asarray(order)
    fixed = np.zeros(k, dtype=bool)
    inverse_scales = safe_inverse(scales)
    for stage_columns in np.array_split(order, max(1, int(stages))):
        free = np.flatnonzero(~fixed)
        h_free = hessian[np.ix_(free, free)]
        # gradient w.r.t. the free columns: (x − w)·H[:, free]; the fixed columns' part is constant in a stage
        base = (relaxed[:, fixed] - target[:, fixed]) @ hessian[np.ix_(fixed, free)]
        x = relaxed[:, free]
        y, momentum = x.copy(), 1.0
        lo, hi, w_free = low[:, free], high[:, free], target[:, free]
        for _ in range(max(1, int(steps))):
            x_next = np.clip(y - step * (base + (y - w_free) @ h_free), lo, hi)
            momentum_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * momentum * momentum))
            y = x_next + ((momentum - 1.0) / momentum_next) * (x_next - x)
            x, momentum = x_next, momentum_next
        relaxed[:, free] = x
        cols = stage_columns
        codes = nearest_codes(
            relaxed[:, cols],
            inverse_scales[:, cols],
            zero_points[:, cols],
            float_zeros[:, cols],
            bits,
            None if zero_mask is None else zero_mask[:, cols],
        )
        relaxed[:, cols] = scales[:, cols] * (codes - zero_points[:, cols]) + float_zeros[:, cols]
        fixed[cols] = True
    return nearest_codes(relaxed, inverse_scales, zero_points, float_zeros, bits, zero_mask).astype(np.uint8)
