"""The single currency between solvers and emitters.

A layer weight is always seen by solvers as a 2-D matrix ``W`` of shape ``[N, K]``:
``N`` output channels, ``K`` the reduction axis.  Groups are contiguous runs of
``group_size`` columns along ``K`` (the last group may be shorter).  Dequantization:

    w[n, k] = scales[n, g] * (codes[n, k] - zero_points[n, g]) + float_zeros[n, g],   g = k // group_size

``codes`` are unsigned integers in ``[0, 2**bits - 1]``.  The two zero conventions are
both special cases of this form:

* integer zero-point (``w = s·(q − zp)``): ``float_zeros`` is ``None`` (zero);
* float zero (decoupleQ, ``w = s·q' + z`` with ``q' ∈ [−2^(b−1), 2^(b−1)−1]``):
  ``zero_points`` is the constant ``2**(bits-1)`` and ``float_zeros`` holds ``z``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes plus per-group float parameters of one ``[N, K]`` weight."""

    codes: np.ndarray  # uint8 [N, K], values in [0, 2**bits - 1]
    scales: np.ndarray  # float32 [N, G]
    zero_points: np.ndarray  # uint8 [N, G], values in [0, 2**bits - 1]
    float_zeros: np.ndarray | None  # float32 [N, G] or None (integer zero-point convention)
    bits: int
    group_size: int  # columns per group along K; equals K for per-channel

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        groups = num_groups(k, self.group_size)
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.scales.shape != (n, groups) or self.zero_points.shape != (n, groups):
            raise ValueError(
                f"scales/zero_points must be {(n, groups)}, got {self.scales.shape}/{self.zero_points.shape}"
            )
        if self.float_zeros is not None and self.float_zeros.shape != (n, groups):
            raise ValueError(f"float_zeros must be {(n, groups)}, got {self.float_zeros.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def has_float_zeros(self) -> bool:
        return self.float_zeros is not None and bool(np.any(self.float_zeros != 0))

    def dequantize(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Return ``s·(q − zp) + z`` as a ``[N, K]`` array (computed in float64, then cast)."""
        return dequantize(self.codes, self.scales, self.zero_points, self.float_zeros, self.group_size).astype(dtype)


def num_groups(k: int, group_size: int) -> int:
    """Number of groups of ``group_size`` columns needed to cover ``k`` columns."""
    return -(-k // group_size)


def expand_groups(per_group: np.ndarray, k: int, group_size: int) -> np.ndarray:
    """Repeat a ``[N, G]`` per-group array to ``[N, K]``."""
    return np.repeat(per_group, group_size, axis=1)[:, :k]


def dequantize(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray,
    float_zeros: np.ndarray | None,
    group_size: int,
) -> np.ndarray:
    """``w = s·(q − zp) + z`` in float64, groups along the last axis."""
    k = codes.shape[1]
    s = expand_groups(scales.astype(np.float64), k, group_size)
    zp = expand_groups(zero_points.astype(np.float64), k, group_size)
    w = s * (codes.astype(np.float64) - zp)
    if float_zeros is not None:
        w += expand_groups(float_zeros.astype(np.float64), k, group_size)
    return w


def select_rows(take_other: np.ndarray, base: QuantizedWeight, other: QuantizedWeight) -> QuantizedWeight:
    """``base`` with the rows where ``take_other`` (bool ``[N]``) is set replaced by ``other``'s (same layout)."""
    if base.bits != other.bits or base.group_size != other.group_size or base.shape != other.shape:
        raise ValueError("select_rows needs two quantized weights of the same shape, bits and group size")
    if (base.float_zeros is None) != (other.float_zeros is None):
        raise ValueError("select_rows needs two quantized weights of the same zero convention")
    rows = np.asarray(take_other, dtype=bool)[:, None]
    float_zeros = None if base.float_zeros is None else np.where(rows, other.float_zeros, base.float_zeros)
    return QuantizedWeight(
        codes=np.where(rows, other.codes, base.codes),
        scales=np.where(rows, other.scales, base.scales),
        zero_points=np.where(rows, other.zero_points, base.zero_points),
        float_zeros=float_zeros,
        bits=base.bits,
        group_size=base.group_size,
    )


def stack_rows(pieces: list[QuantizedWeight]) -> QuantizedWeight:
    """Concatenate quantized weights along N (same bits and group size; a missing float zero counts as 0)."""
    if len(pieces) == 1:
        return pieces[0]
    float_zeros = None
    if any(p.float_zeros is not None for p in pieces):
        float_zeros = np.concatenate([np.zeros_like(p.scales) if p.float_zeros is None else p.float_zeros
                                      for p in pieces])
    return QuantizedWeight(np.concatenate([p.codes for p in pieces]), np.concatenate([p.scales for p in pieces]),
                           np.concatenate([p.zero_points for p in pieces]), float_zeros, pieces[0].bits,
                           pieces[0].group_size)
