"""``H = Σ xᵀx`` accumulated in float64 over blocks of ≤ 2048 rows (float32 BLAS ``syrk`` per block, relative error
~1e-7); ``C = Σ xᵀx_float`` alongside for float targets.  Numpy only."""

from __future__ import annotations

import itertools

import numpy as np
from scipy.linalg import blas

from onnxq.errors import OnnxqError
from onnxq.stats.unfold import Unfolding, unfold_rows


class HessianSum:
    """Running ``H = Σ xᵀx`` in float64 (upper triangle until :meth:`result`) and the number of rows seen.

    With ``cross``, also ``C = Σ xᵀx_ref`` for a reference activation ``x_ref`` of the same shape (the float
    model's input of the same layer, while ``x`` comes from the partially quantized model).
    """

    def __init__(self, unfold: Unfolding, cross: bool = False) -> None:
        self.unfold = unfold
        self.upper = np.zeros((unfold.groups, unfold.size, unfold.size), dtype=np.float64)
        self.cross = np.zeros_like(self.upper) if cross else None
        self.rows = 0

    def add(self, x: np.ndarray, reference: np.ndarray | None = None) -> None:
        """Add every row of one activation tensor (and of its reference, for :attr:`cross`)."""
        groups, size = self.unfold.groups, self.unfold.size
        references = unfold_rows(reference, self.unfold) if reference is not None else itertools.repeat(None)
        for block, ref in zip(unfold_rows(x, self.unfold), references, strict=False):  # same shapes
            if block.shape[1] != groups * size:
                raise OnnxqError(
                    f"activation '{self.unfold.tensor}' unfolds to {block.shape[1]} columns, the layer expects "
                    f"{groups}·{size}; the model is inconsistent"
                )
            self.rows += block.shape[0]
            if groups == 1:
                self.upper[0] += blas.ssyrk(1.0, block.T, trans=0)  # block.T is F-contiguous: no copy
            else:
                per_group = block.reshape(-1, groups, size).transpose(1, 0, 2)  # [G, rows, K']
                self.upper += np.matmul(per_group.transpose(0, 2, 1), per_group)
            if self.cross is not None and ref is not None:
                ref_groups = ref.reshape(-1, groups, size).transpose(1, 0, 2)
                block_groups = block.reshape(-1, groups, size).transpose(1, 0, 2)
                self.cross += np.matmul(block_groups.transpose(0, 2, 1), ref_groups)

    def result(self) -> np.ndarray:
        """The symmetric ``H`` (``[K, K]``, or ``[groups, K', K']`` for a grouped conv)."""
        upper = np.triu(self.upper)
        full = upper + np.swapaxes(np.triu(self.upper, 1), -1, -2)
        return full[0] if self.unfold.groups == 1 else full

    def cross_result(self) -> np.ndarray | None:
        """``C = Σ xᵀx_ref`` (same layout as :meth:`result`), or None without references."""
        if self.cross is None:
            return None
        return self.cross[0] if self.unfold.groups == 1 else self.cross.copy()
