"""Round-to-nearest (RTN) uniform quantization, with optional MSE-optimal range shrinking.

Per group (``group_size`` columns of ``W[N, K]``), with ``L = 2^b − 1``:

* asymmetric, integer zero-point: ``s = (max − min)/L``, ``zp = clip(round(−min/s), 0, L)``,
  ``q = clip(round(w/s) + zp, 0, L)``, ``w ≈ s·(q − zp)``;
* asymmetric, float zero:          ``s = (max − min)/L``, ``q = clip(round((w − min)/s), 0, L)``,
  ``w ≈ s·q + min`` (stored as zero-point ``2^(b−1)`` and offset ``min + s·2^(b−1)``);
* symmetric: ``s = m/(−2^(b−1))`` with ``m`` the value of largest magnitude (so ``s`` may be
  negative), ``zp = 2^(b−1)``.

With ``clip_search`` the range is shrunk by factors ``α ∈ [min_shrink, 1]`` and the α of least
squared error is kept per group.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from onnxq.quantized_weight import QuantizedWeight
from onnxq.solvers.grouping import from_groups, resolve_group_size, to_groups

ZeroConvention = Literal["integer", "float"]


def quantize_rtn(
    weight: np.ndarray,
    bits: int,
    group_size: int = 64,
    symmetric: bool = False,
    zero_convention: ZeroConvention = "integer",
    clip_search: bool = False,
    clip_grid: int = 20,
    min_shrink: float = 0.5,
) -> QuantizedWeight:
    """Quantize ``weight[N, K]`` to ``bits`` bits by round-to-nearest, groups along ``K``."""
    weight = np.asarray(weight, dtype=np.float64)
    n, k = weight.shape
    group_size = resolve_group_size(k, group_size)
    grouped = to_groups(weight, group_size)  # NaN-padded
    lo = np.nanmin(grouped, axis=2)
    hi = np.nanmax(grouped, axis=2)

    best = _rtn_params(lo, hi, bits, symmetric, zero_convention)
    if clip_search:
        best_err = _group_error(grouped, *best, bits=bits)
        for alpha in np.linspace(1.0, min_shrink, clip_grid)[1:]:
            cand = _rtn_params(lo * alpha, hi * alpha, bits, symmetric, zero_convention)
            err = _group_error(grouped, *cand, bits=bits)
            better = err < best_err
            best = tuple(np.where(better, c, b) for c, b in zip(cand, best, strict=True))
            best_err = np.where(better, err, best_err)

    scales, zero_points, offsets = best
    codes = _round_codes(grouped, scales, zero_points, offsets, bits)
    return QuantizedWeight(
        codes=from_groups(codes, k).astype(np.uint8),
        scales=scales.astype(np.float32),
        zero_points=zero_points.astype(np.uint8),
        offsets=offsets.astype(np.float32) if zero_convention == "float" else None,
        bits=bits,
        group_size=group_size,
    )


def _rtn_params(
    lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool, zero_convention: ZeroConvention
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scales, integer zero-points and float offsets (all ``[N, G]``) from a per-group range."""
    levels = (1 << bits) - 1
    mid = 1 << (bits - 1)
    if symmetric:
        # the value of largest magnitude maps exactly to code 0 (q' = −2^(b−1)); s may be negative
        extreme = np.where(np.abs(lo) >= np.abs(hi), lo, hi)
        scales = np.where(extreme != 0, extreme / -mid, 1.0)
        zero_points = np.full(lo.shape, mid, dtype=np.float64)
        return scales, zero_points, np.zeros_like(scales)
    lo = np.minimum(lo, hi)
    span = hi - lo
    scales = np.where(span > 0, span / levels, np.where(lo != 0, np.abs(lo), 1.0))
    if zero_convention == "float":
        zero_points = np.full(lo.shape, mid, dtype=np.float64)
        offsets = lo + scales * mid  # code 0 → lo exactly
        return scales, zero_points, offsets
    zero_points = np.clip(np.round(-lo / scales), 0, levels)
    return scales, zero_points, np.zeros_like(scales)


def _round_codes(
    grouped: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, offsets: np.ndarray, bits: int
) -> np.ndarray:
    """``q = clip(round((w − z)/s) + zp, 0, 2^b − 1)`` per group; padding becomes code ``zp``."""
    levels = (1 << bits) - 1
    q = np.round((grouped - offsets[..., None]) / scales[..., None]) + zero_points[..., None]
    q = np.where(np.isnan(q), zero_points[..., None], q)
    return np.clip(q, 0, levels)


def _group_error(
    grouped: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, offsets: np.ndarray, bits: int
) -> np.ndarray:
    """Sum of squared dequantization errors per group (padding ignored)."""
    q = _round_codes(grouped, scales, zero_points, offsets, bits)
    deq = scales[..., None] * (q - zero_points[..., None]) + offsets[..., None]
    return np.nansum((deq - grouped) ** 2, axis=2)
