"""The one grid rule: per-group scales, zero-points and float_zeros from a value range, and nearest codes on a grid.

A group's grid is ``q(c) = s·(c − zp) + z`` for codes ``c ∈ [0, L]``, ``L = 2^b − 1``.  From the group's range
``[lo, hi]`` (``m = 2^(b−1)``):

* asymmetric, integer zero-point (``z = 0``): the range is first widened to contain 0, ``lo' = min(lo, 0)``,
  ``hi' = max(hi, 0)`` (``zp`` is a code, so 0 must lie on the grid); ``s = (hi' − lo')/L``, ``zp = round(−lo'/s)``;
* asymmetric, float zero: ``s = (hi − lo)/L``, ``zp = m`` and ``z = lo + s·m`` (code 0 is ``lo``);
* symmetric (``zp = m``, ``z = 0``): the value of largest magnitude ``e`` goes to code 0 and the other side must
  still be covered, so ``|s| = max(|e|/m, |o|/(m − ½))`` for the largest magnitude ``o`` of the other sign, and
  ``s`` has the sign of ``−e``.

Scales are rounded *up* (in magnitude) to the storage dtype and ``zp``/``z`` are derived from the stored scale, so
every value of ``[lo, hi]`` is within ``s/2`` of its nearest grid point in the stored parameters (up to the storage
precision of ``z``): round-to-nearest never clips.  A zero span gives ``s = |lo|`` (or 1 for an all-zero group)
and, with a float zero, ``z = lo`` at code ``m``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from onnxq.quantized_weight import QuantizedWeight, expand_groups

ZeroConvention = Literal["integer", "float"]


def minmax_grid(
    lo: np.ndarray,
    hi: np.ndarray,
    bits: int,
    symmetric: bool = False,
    zero_convention: ZeroConvention = "integer",
    dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scales, zero_points, float_zeros)`` (float64, ``lo``'s shape) of the grid covering ``[lo, hi]`` per group.

    Scales and float_zeros are exactly representable in ``dtype`` (the storage type of the emitted scales).
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    levels = (1 << bits) - 1
    mid = 1 << (bits - 1)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    if symmetric:
        lo_is_extreme = np.abs(lo) >= np.abs(hi)
        extreme = np.where(lo_is_extreme, -lo, hi)  # magnitude of the side that maps to code 0
        other = np.where(lo_is_extreme, np.maximum(hi, 0.0), np.maximum(-lo, 0.0))
        magnitude = np.maximum(extreme / mid, other / (mid - 0.5))
        magnitude = round_up(np.where(magnitude > 0, magnitude, 1.0), dtype)
        scales = np.where(lo_is_extreme, magnitude, -magnitude)  # e·(1/s) = −m: the extreme lands on code 0
        return scales, np.full(lo.shape, float(mid)), np.zeros(lo.shape)
    if zero_convention == "float":
        span = hi - lo
        scales = round_up(np.where(span > 0, span / levels, np.where(lo != 0, np.abs(lo), 1.0)), dtype)
        # code 0 → lo (up to z's precision); a constant group is z itself, at code m (no overflow near float max)
        float_zeros = np.where(span > 0, lo + scales * mid, lo).astype(dtype).astype(np.float64)
        return scales, np.full(lo.shape, float(mid)), float_zeros
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    span = hi - lo
    scales = round_up(np.where(span > 0, span / levels, 1.0), dtype)
    zero_points = np.clip(np.rint(-lo / scales), 0, levels)
    return scales, zero_points, np.zeros(lo.shape)


def round_up(values: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """``values`` (positive, float64) rounded up to the nearest number representable in ``dtype``."""
    stored = np.asarray(values, dtype=np.float64).astype(dtype)
    low = stored.astype(np.float64) < values
    stored = np.where(low, np.nextafter(stored, np.array(np.inf, dtype=dtype)), stored)
    return stored.astype(np.float64)


def safe_inverse(scales: np.ndarray) -> np.ndarray:
    """``1/s`` where ``s ≠ 0``, else 0 (a zero scale maps everything to code ``zp``)."""
    out = np.zeros(np.shape(scales), dtype=np.float64)
    np.divide(1.0, scales, out=out, where=np.asarray(scales) != 0)
    return out


def nearest_codes(
    values: np.ndarray,
    inverse_scales: np.ndarray,
    zero_points: np.ndarray,
    float_zeros: np.ndarray,
    bits: int,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """``clip(round((w − z)/s) + zp, 0, 2^b − 1)`` elementwise (float64); masked and NaN entries get ``zp``."""
    # np.clip(np.rint((v − z)·(1/s)) + zp, 0, L) as ufuncs with in-place steps (called per column in loops)
    codes = np.multiply(np.subtract(values, float_zeros), inverse_scales)
    np.rint(codes, out=codes)
    codes = codes + zero_points
    np.maximum(codes, 0.0, out=codes)
    np.minimum(codes, float((1 << bits) - 1), out=codes)
    if mask is not None:
        codes = np.where(mask, zero_points, codes)
    nan = np.isnan(codes)
    return np.where(nan, zero_points, codes) if nan.any() else codes


def off_grid(
    weight: np.ndarray,
    quantized: QuantizedWeight,
    dtype: np.dtype | type = np.float32,
    dequantized: np.ndarray | None = None,
) -> np.ndarray:
    """Bool ``[N, K]``: where ``|w − ŵ|`` exceeds half a step, ``|s|/2``, plus the storage precision of ``w``
    and ``z`` (``4·eps(dtype)·(|w| + |z|)``).  Never set for round-to-nearest on a min/max grid.  ``dequantized``:
    ``quantized.dequantize(np.float64)`` when the caller has it already."""
    k = quantized.shape[1]
    step = np.abs(expand_groups(quantized.scales.astype(np.float64), k, quantized.group_size))
    zeros = 0.0 if quantized.float_zeros is None else expand_groups(quantized.float_zeros, k, quantized.group_size)
    weight = np.asarray(weight, dtype=np.float64)
    tolerance = 4.0 * float(np.finfo(dtype).eps) * (np.abs(weight) + np.abs(zeros))
    if dequantized is None:
        dequantized = quantized.dequantize(np.float64)
    return np.abs(weight - dequantized) > 0.5 * step + tolerance
