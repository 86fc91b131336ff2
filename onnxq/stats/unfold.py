"""Unfolding an activation into the rows ``x`` (length ``K``) a layer multiplies: rows of ``X`` (``X·B``, Gemm),
columns (``A·X``), or im2col patches of a 1-D/2-D convolution ordered ``(cin, kh, kw)`` like ``W.reshape(Cout, -1)``.
Numpy only."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from onnxq.errors import OnnxqError

ROW_BLOCK = 2048  # rows per float32 syrk before adding into the float64 sum
PATCH_BLOCK_BYTES = 32 << 20  # bound on one block of im2col patches


@dataclass(frozen=True)
class Unfolding:
    """How one key turns its activation tensor into rows ``x`` of length ``K`` (per conv group)."""

    tensor: str
    kind: str  # "rows", "columns" or "conv"
    size: int  # K (conv: K' = Cin/groups·prod(kernel))
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begins then ends, as in ONNX
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @property
    def hessian_shape(self) -> tuple[int, ...]:
        return (self.groups, self.size, self.size) if self.groups > 1 else (self.size, self.size)

    @property
    def hessian_bytes(self) -> int:
        return 8 * self.groups * self.size * self.size


def conv_pads(unfold: Unfolding, spatial_shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Begin and end padding per spatial axis (explicit pads, or the ``auto_pad`` rule of ONNX Conv)."""
    n = len(unfold.kernel)
    if unfold.auto_pad == "NOTSET":
        return list(unfold.pads[:n]), list(unfold.pads[n:])
    if unfold.auto_pad == "VALID":
        return [0] * n, [0] * n
    begins, ends = [], []
    for size, k, s, d in zip(spatial_shape, unfold.kernel, unfold.strides, unfold.dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(small if unfold.auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins, ends


def conv_patches(x: np.ndarray, unfold: Unfolding) -> Iterator[np.ndarray]:
    """im2col of ``x[B, C, *spatial]`` in blocks: float32 ``[rows, C·prod(kernel)]``, columns ordered (c, kh, kw).

    Row order is (batch, *output position); group ``g`` owns columns ``g·K' … (g+1)·K'``.
    """
    spatial = x.shape[2:]
    if len(spatial) != len(unfold.kernel):
        raise OnnxqError(
            f"activation '{unfold.tensor}' has shape {x.shape}, expected {len(unfold.kernel)} spatial axes for the "
            "convolution reading it; the model is inconsistent"
        )
    begins, ends = conv_pads(unfold, spatial)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begins, ends, strict=True)])
    spans = [d * (k - 1) + 1 for k, d in zip(unfold.kernel, unfold.dilations, strict=True)]
    axes = tuple(range(2, 2 + len(spatial)))
    windows = sliding_window_view(padded, spans, axis=axes)  # [B, C, *full positions, *spans]
    step = tuple(slice(None, None, s) for s in unfold.strides) + tuple(slice(None, None, d) for d in unfold.dilations)
    windows = windows[(slice(None), slice(None), *step)]  # [B, C, *out, *kernel]
    n_spatial = len(spatial)
    # → [B, *out, C, *kernel]
    order = (0, *range(2, 2 + n_spatial), 1, *range(2 + n_spatial, 2 + 2 * n_spatial))
    windows = windows.transpose(order)
    out_shape = windows.shape[1 : 1 + n_spatial]
    width = math.prod(windows.shape[1 + n_spatial :])
    row_bytes = 4 * width
    sample_bytes = row_bytes * math.prod(out_shape)
    if sample_bytes <= PATCH_BLOCK_BYTES:  # whole samples per block
        step = max(1, PATCH_BLOCK_BYTES // max(sample_bytes, 1))
        for start in range(0, windows.shape[0], step):
            yield np.ascontiguousarray(windows[start : start + step], dtype=np.float32).reshape(-1, width)
        return
    step = max(1, PATCH_BLOCK_BYTES // (row_bytes * math.prod(out_shape[1:])))  # slices of the first output axis
    for b in range(windows.shape[0]):
        for start in range(0, out_shape[0], step):
            yield np.ascontiguousarray(windows[b, start : start + step], dtype=np.float32).reshape(-1, width)


def unfold_rows(x: np.ndarray, unfold: Unfolding) -> Iterator[np.ndarray]:
    """Blocks of rows ``x`` (float32 ``[rows, K]``, or ``[rows, groups·K']`` for conv) of one activation."""
    if unfold.kind == "conv":
        yield from conv_patches(x, unfold)
        return
    if unfold.kind == "columns":
        x = x.reshape(1, -1) if x.ndim == 1 else np.swapaxes(x, -1, -2)  # 1-D X is one column
    if x.shape[-1] != unfold.size:
        raise OnnxqError(
            f"activation '{unfold.tensor}' has shape {x.shape}; its reduction axis should have {unfold.size} "
            "entries for the layer reading it; the model is inconsistent"
        )
    rows = x.reshape(-1, unfold.size)
    for start in range(0, rows.shape[0], ROW_BLOCK):
        yield np.ascontiguousarray(rows[start : start + ROW_BLOCK], dtype=np.float32)
