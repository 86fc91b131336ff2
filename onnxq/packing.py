"""Bit packing shared by emitters, tests and the custom-op tests.

Layout (the same as ``com.microsoft::MatMulNBits``): values are written LSB-first into a
little-endian bit stream along the last axis, i.e. value ``i`` occupies bits
``[i·b, (i+1)·b)`` of the stream, and byte ``j`` holds stream bits ``[8j, 8j+8)``.
For b ∈ {2, 4, 8} no value straddles a byte; for b = 3 values do straddle bytes.
The last axis is padded with zeros to a whole number of bytes.
"""

from __future__ import annotations

import numpy as np


def packed_length(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values of ``bits`` bits: ``ceil(count·bits / 8)``."""
    return -(-count * bits // 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``values`` (< 2**bits) along the last axis into uint8, LSB-first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    count = values.shape[-1]
    if 8 % bits == 0:  # whole values per byte: shift and add
        per_byte = 8 // bits
        pad = -count % per_byte
        v = values.astype(np.uint8)
        if pad:
            v = np.concatenate([v, np.zeros((*v.shape[:-1], pad), np.uint8)], axis=-1)
        v = v.reshape(*v.shape[:-1], -1, per_byte)
        out = np.zeros(v.shape[:-1], np.uint8)
        for i in range(per_byte):
            out |= v[..., i] << np.uint8(i * bits)
        return out
    # bit plane expansion: [..., count, bits] -> stream [..., count*bits]
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((values.astype(np.uint8)[..., None] >> shifts) & 1).reshape(*values.shape[:-1], count * bits)
    pad = packed_length(count, bits) * 8 - count * bits
    if pad:
        stream = np.concatenate([stream, np.zeros((*stream.shape[:-1], pad), np.uint8)], axis=-1)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` ``bits``-bit values of each row, as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    packed = np.asarray(packed, dtype=np.uint8)
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : count * bits]
    planes = stream.reshape(*packed.shape[:-1], count, bits).astype(np.uint8)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (planes.astype(np.uint16) * weights).sum(axis=-1).astype(np.uint8)
