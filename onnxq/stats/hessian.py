"""``H = Σ xᵀx`` accumulated in float64 over blocks of ≤ 2048 rows (float32 BLAS ``syrk`` per block, relative error
~1e-7); ``C = Σ xᵀx_float`` alongside for float targets.  Numpy only.

The calibration batches are cut into contiguous *shards* (:mod:`onnxq.calibration.shards`): each shard is summed from
zero, and the shard sums are added in shard order.  Floating-point addition is not associative, so this order is
part of the result: a data-parallel run whose workers each sum whole shards and whose driver adds the shard sums in
the same order (:meth:`HessianSum.fold`) gives the same bytes as one process."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas

from onnxq.errors import OnnxqError
from onnxq.stats.unfold import Unfolding, unfold_rows

CROSS_CUT = 4  # C's first K / CROSS_CUT rows are the job that follows H (see HessianSum.parts)


@dataclass
class ShardSum:
    """One shard's sums: the upper triangle of ``Σ xᵀx`` (``[groups, K, K]`` float64; one group's matrix is
    column-major, see :meth:`HessianSum._allocate`, but any layout folds to the same values), ``Σ xᵀx_ref`` or None,
    and the rows seen."""

    upper: np.ndarray
    cross: np.ndarray | None
    rows: int


class HessianSum:
    """Running ``H = Σ xᵀx`` in float64 (upper triangle until :meth:`result`) and the number of rows seen.

    With ``cross``, also ``C = Σ xᵀx_ref`` for a reference activation ``x_ref`` of the same shape (the float
    model's input of the same layer, while ``x`` comes from the partially quantized model).

    Rows are added to the current shard; :meth:`end_shard` closes it: its sums are added to the total
    (:meth:`fold`), or kept in :attr:`shards` with ``keep_shards`` (a worker that returns them to a driver).  The
    first shard becomes the total as it is (``0 + s = s``), so one shard gives the plain running sum.
    """

    def __init__(self, unfold: Unfolding, cross: bool = False, keep_shards: bool = False) -> None:
        self.unfold = unfold
        self.with_cross = cross
        self.keep_shards = keep_shards
        self.shards: list[ShardSum] = []  # closed shards, with keep_shards
        self.total: ShardSum | None = None
        self._open()

    def _open(self) -> None:
        """A new open shard; its arrays are allocated by the first :meth:`add` (one shard holds one copy of H)."""
        self.upper: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.shard_rows = 0

    def _allocate(self) -> None:
        groups, size = self.unfold.groups, self.unfold.size
        if groups == 1:  # column-major, the layout ``ssyrk`` returns: each block's ``+=`` reads both in order
            self.upper = np.zeros((size, size), dtype=np.float64, order="F")[None]
        else:
            self.upper = np.zeros((groups, size, size), dtype=np.float64)
        self.cross = np.zeros((groups, size, size), dtype=np.float64) if self.with_cross else None

    @property
    def rows(self) -> int:
        """Rows seen (folded shards and the open one)."""
        return self.shard_rows + (0 if self.total is None else self.total.rows)

    def end_shard(self) -> None:
        """Close the open shard: fold it into the total, or keep it (``keep_shards``)."""
        if self.upper is None:
            self._allocate()
        closed = ShardSum(self.upper, self.cross, self.shard_rows)
        self._open()
        if self.keep_shards:
            self.shards.append(closed)
        else:
            self.fold(closed)

    def fold(self, shard: ShardSum) -> None:
        """Add one shard's sums to the total; shards must come in shard order (the first is taken as it is)."""
        if self.total is None:  # owned and writable (arrays from another process may be read-only views)
            self.total = ShardSum(_writable(shard.upper), None if shard.cross is None else _writable(shard.cross),
                                  shard.rows)
            return
        self.total.upper += shard.upper
        if self.total.cross is not None and shard.cross is not None:
            self.total.cross += shard.cross
        self.total.rows += shard.rows

    def _finished(self) -> ShardSum:
        """The total, after closing an open shard that holds rows (or when nothing was folded yet)."""
        if self.keep_shards:
            raise ValueError("a HessianSum that keeps its shards has no total; fold the shards into another")
        if self.total is None or self.shard_rows:
            self.end_shard()
        return self.total

    def add(self, x: np.ndarray, reference: np.ndarray | None = None) -> None:
        """Add every row of one activation tensor (and of its reference, for :attr:`cross`)."""
        for part in self.parts(x, reference):
            part()

    def parts(self, x: np.ndarray, reference: np.ndarray | None = None) -> list[Callable[[], None]]:
        """:meth:`add` as independent calls that write different arrays (or rows) and may run at the same time on
        two threads; each sum's own updates stay in batch order, so the result does not depend on it.

        With a reference (one group), ``C``'s rows ``[K/4, K)``, then ``H``, then ``C``'s rows ``[0, K/4)``: ``H``'s
        ``syrk`` is half of ``C``'s products, so two threads each get ≈ 3/4 of ``C``'s work.  Each entry of ``C``
        is the same dot product whichever rows are computed with it.  A conv layer's patches are unfolded once, so
        it is one call."""
        if self.upper is None:
            self._allocate()
        cross = self.cross is not None and reference is not None
        if self.unfold.kind == "conv" and cross:
            return [lambda: self._add_blocks(x, reference, upper=True)]
        hessian = [lambda: self._add_blocks(x, None, upper=True)]
        if not cross:
            return hessian
        if self.unfold.groups > 1:
            return [*hessian, lambda: self._add_blocks(x, reference, upper=False)]
        cut = self.unfold.size // CROSS_CUT
        if cut == 0:  # K < CROSS_CUT: one job for C
            return [lambda: self._add_blocks(x, reference, upper=False), *hessian]
        return [lambda: self._add_blocks(x, reference, upper=False, cross_rows=slice(cut, None)), *hessian,
                lambda: self._add_blocks(x, reference, upper=False, cross_rows=slice(0, cut))]

    def _add_blocks(self, x: np.ndarray, reference: np.ndarray | None, upper: bool,
                    cross_rows: slice = slice(None)) -> None:
        """``H += Σ xᵀx`` over ``x``'s row blocks (with ``upper``, counting the rows), and ``C += Σ xᵀx_ref`` when
        ``reference`` is given (only ``C``'s rows ``cross_rows``, one group)."""
        groups, size = self.unfold.groups, self.unfold.size
        references = unfold_rows(reference, self.unfold) if reference is not None else itertools.repeat(None)
        for block, ref in zip(unfold_rows(x, self.unfold), references, strict=False):  # same shapes
            if block.shape[1] != groups * size:
                raise OnnxqError(
                    f"activation '{self.unfold.tensor}' unfolds to {block.shape[1]} columns, the layer expects "
                    f"{groups}·{size}; the model is inconsistent"
                )
            block_groups = block.reshape(-1, groups, size).transpose(1, 0, 2)  # [G, rows, K']
            if upper:
                self.shard_rows += block.shape[0]
                if groups == 1:
                    self.upper[0] += blas.ssyrk(1.0, block.T, trans=0)  # block.T is F-contiguous: no copy
                else:
                    self.upper += np.matmul(block_groups.transpose(0, 2, 1), block_groups)
            if ref is not None and groups == 1:
                self.cross[0, cross_rows] += block[:, cross_rows].T @ ref
            elif ref is not None:
                ref_groups = ref.reshape(-1, groups, size).transpose(1, 0, 2)
                self.cross += np.matmul(block_groups.transpose(0, 2, 1), ref_groups)

    def result(self) -> np.ndarray:
        """The symmetric ``H`` (``[K, K]`` C-contiguous, or ``[groups, K', K']`` for a grouped conv)."""
        upper = self._finished().upper
        if self.unfold.groups == 1 and not upper[0].flags.c_contiguous:
            # column-major upper triangle = row-major lower triangle of the same values: mirror that, in order
            return _mirror_lower(upper[0].T[None])[0]
        full = _mirror_lower(upper.transpose(0, 2, 1)).transpose(0, 2, 1)
        return full[0] if self.unfold.groups == 1 else full

    def cross_result(self) -> np.ndarray | None:
        """``C = Σ xᵀx_ref`` (same layout as :meth:`result`), or None without references."""
        cross = self._finished().cross if self.with_cross else None
        if cross is None:
            return None
        return cross[0] if self.unfold.groups == 1 else cross.copy()


MIRROR_COLUMNS = 512  # columns of H mirrored per step (bounds the temporary to MIRROR_COLUMNS·K values)


def _mirror_lower(total: np.ndarray) -> np.ndarray:
    """``[G, K, K]`` with each upper triangle replaced, in place, by the transposed lower triangle: ``H[i, j] =
    H[j, i]`` for ``i < j``.  The sums hold one triangle (above it zeros, or the same products for a grouped conv);
    :meth:`HessianSum.result` passes the transposed view of its upper triangle, so ``H`` is its upper triangle."""
    size = total.shape[-1]
    for start in range(0, size, MIRROR_COLUMNS):
        stop = min(start + MIRROR_COLUMNS, size)
        for matrix in total:
            block = matrix[:stop, start:stop]  # columns start..stop-1, rows up to the block's last diagonal entry
            lower_part = matrix[start:stop, :stop].T  # H[j, i] for the same (i, j)
            above = np.triu(np.ones((stop, stop - start), dtype=bool), k=1 - start)  # i < j
            block[above] = lower_part[above]
    return total


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy(order="K")
