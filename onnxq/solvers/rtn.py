"""Round-to-nearest (RTN) uniform quantization, with optional MSE-optimal range shrinking.

Per group (``group_size`` columns of ``W[N, K]``) the grid ``q(c) = s·(c − zp) + z`` comes from the group's
``[min, max]`` by :func:`onnxq.solvers.grid.minmax_grid` (the one grid rule), and ``c = clip(round((w − z)/s) + zp,
0, 2^b − 1)``.  Without ``clip_search`` every element is within ``s/2`` of its dequantized value.

With ``clip_search`` the range is shrunk by factors ``α ∈ [min_shrink, 1]`` and the α of least
squared error is kept per group (the only case where values may be clipped).
"""

from __future__ import annotations

import numpy as np

from onnxq.quantized_weight import QuantizedWeight
from onnxq.solvers.grid import ZeroConvention, minmax_grid, nearest_codes, safe_inverse
from onnxq.solvers.grouping import from_groups, resolve_group_size, to_groups


def quantize_rtn(
    weight: np.ndarray,
    bits: int,
    group_size: int = 64,
    symmetric: bool = False,
    zero_convention: ZeroConvention = "integer",
    clip_search: bool = False,
    clip_grid: int = 20,
    min_shrink: float = 0.5,
    scale_dtype: np.dtype | type = np.float32,
) -> QuantizedWeight:
    """Quantize ``weight[N, K]`` to ``bits`` bits by round-to-nearest, groups along ``K``.

    ``scale_dtype`` is the type the scales (and float zeros) will be stored in; the codes are rounded on the
    grid of the stored parameters, so the bound ``|w − ŵ| ≤ s/2`` holds for what runs.
    """
    weight = np.asarray(weight, dtype=np.float64)
    n, k = weight.shape
    group_size = resolve_group_size(k, group_size)
    grouped = to_groups(weight, group_size)  # NaN-padded
    lo = np.nanmin(grouped, axis=2)
    hi = np.nanmax(grouped, axis=2)

    best = minmax_grid(lo, hi, bits, symmetric, zero_convention, scale_dtype)
    if clip_search:
        best_err = _group_error(grouped, *best, bits=bits)
        for alpha in np.linspace(1.0, min_shrink, clip_grid)[1:]:
            cand = minmax_grid(lo * alpha, hi * alpha, bits, symmetric, zero_convention, scale_dtype)
            err = _group_error(grouped, *cand, bits=bits)
            better = err < best_err
            best = tuple(np.where(better, c, b) for c, b in zip(cand, best, strict=True))
            best_err = np.where(better, err, best_err)

    scales, zero_points, float_zeros = best
    codes = _round_codes(grouped, scales, zero_points, float_zeros, bits)
    return QuantizedWeight(
        codes=from_groups(codes, k).astype(np.uint8),
        scales=scales.astype(np.float32),
        zero_points=zero_points.astype(np.uint8),
        float_zeros=float_zeros.astype(np.float32) if zero_convention == "float" else None,
        bits=bits,
        group_size=group_size,
    )


def _round_codes(
    grouped: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, float_zeros: np.ndarray, bits: int
) -> np.ndarray:
    """Nearest codes per group (``[N, G, group_size]``); padding (NaN) becomes code ``zp``."""
    return nearest_codes(grouped, safe_inverse(scales)[..., None], zero_points[..., None], float_zeros[..., None], bits)


def _group_error(
    grouped: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, float_zeros: np.ndarray, bits: int
) -> np.ndarray:
    """Sum of squared dequantization errors per group (padding ignored)."""
    q = _round_codes(grouped, scales, zero_points, float_zeros, bits)
    deq = scales[..., None] * (q - zero_points[..., None]) + float_zeros[..., None]
    return np.nansum((deq - grouped) ** 2, axis=2)
