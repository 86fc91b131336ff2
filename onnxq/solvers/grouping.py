"""Reshaping a ``[N, K]`` weight into groups along ``K`` and back."""

from __future__ import annotations

import numpy as np

from onnxq.quantized_weight import num_groups


def resolve_group_size(k: int, group_size: int) -> int:
    """``-1`` (or anything ≥ K) means one group per output channel: returns ``K``."""
    if group_size == -1 or group_size >= k:
        return k
    if group_size < 1:
        raise ValueError(f"group size must be -1 or a positive integer, got {group_size}")
    return group_size


def to_groups(w: np.ndarray, group_size: int, fill: float = np.nan) -> np.ndarray:
    """``[N, K]`` → ``[N, G, group_size]``, padding the last group with ``fill``."""
    n, k = w.shape
    groups = num_groups(k, group_size)
    pad = groups * group_size - k
    if pad:
        w = np.concatenate([w, np.full((n, pad), fill, dtype=w.dtype)], axis=1)
    return w.reshape(n, groups, group_size)


def from_groups(grouped: np.ndarray, k: int) -> np.ndarray:
    """``[N, G, group_size]`` → ``[N, K]`` (drops padding)."""
    n = grouped.shape[0]
    return grouped.reshape(n, -1)[:, :k]
