"""The column loops of the solvers: compiled when ``libonnxq_sweeps`` was built, numpy otherwise, same bits either way.

GPTQ's column sweep (:mod:`onnxq.solvers.gptq`) and coordinate descent (:mod:`onnxq.solvers.rounding`) visit the
columns of a weight one at a time, each step a dozen operations on ``n``-vectors: in numpy the interpreter, not the
arithmetic, sets their cost.  ``pip install`` compiles ``custom_ops/solver/sweeps.cc`` into ``onnxq/lib``; it does
exactly the float64 operations of the numpy functions here, in the same order and without fused multiply-adds, so
the two give bit-identical results (``tests/test_sweeps.py``) and an output never depends on whether the library
was built.  ``ONNXQ_NATIVE_SWEEPS=0`` forces numpy.

Layout: ``[K, n]`` arrays are C-contiguous float64 in processing order (row ``c``: column ``c`` of all ``n`` weight
rows); masks are bool ``[K, n]`` or None.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np

from onnxq.solvers.grid import nearest_codes

LIBRARY = Path(__file__).resolve().parent.parent / "lib" / (
    "libonnxq_sweeps" + (".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"))
ENV_SWITCH = "ONNXQ_NATIVE_SWEEPS"

_p = ctypes.c_void_p
_i64 = ctypes.c_int64


def _load() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0" or not LIBRARY.is_file():
        return None
    try:
        library = ctypes.CDLL(str(LIBRARY))
        library.onnxq_gptq_columns, library.onnxq_cd_block  # noqa: B018 (a library from another version lacks them)
    except (OSError, AttributeError):
        return None
    library.onnxq_gptq_columns.restype = None
    library.onnxq_gptq_columns.argtypes = [_p, _p, _i64, _i64, _p, _p, _p, _p, _p, _p, _p, _i64, _p, ctypes.c_double,
                                           _i64, _i64, _i64]
    library.onnxq_cd_block.restype = None
    library.onnxq_cd_block.argtypes = [_p, _p, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p,
                                       ctypes.c_double]
    return library


_NATIVE = _load()


def native() -> bool:
    """Whether the compiled sweeps are in use."""
    return _NATIVE is not None


def _address(array: np.ndarray | None) -> int | None:
    """The data address of a C-contiguous array (None for None)."""
    if array is None:
        return None
    if not array.flags.c_contiguous:
        raise ValueError("the compiled sweeps need C-contiguous arrays")
    return array.ctypes.data


class GptqSweep:
    """GPTQ's per-column steps over one weight's arrays, bound once (a call then passes positions only).

    ``work``: the weights being rounded; ``upper``: ``U``; ``params``: ``(scales, zero_points, float_zeros,
    inverse_scales)``; ``mask`` or None; ``codes``: uint8 out; ``errors``: ``[block, n]``, the current block's
    scaled errors; ``loss``: ``[n]``; ``bits``: of the codes.  All ``[K, n]`` but ``upper`` (``[K, K]``)."""

    def __init__(self, work: np.ndarray, upper: np.ndarray, params: tuple[np.ndarray, ...], mask: np.ndarray | None,
                 codes: np.ndarray, errors: np.ndarray, loss: np.ndarray, bits: int) -> None:
        self.work, self.upper, self.params, self.mask = work, upper, params, mask
        self.codes, self.errors, self.loss, self.bits = codes, errors, loss, bits
        if _NATIVE is not None:
            k, n = work.shape
            self._arguments = (_address(work), _address(upper), k, n, *(_address(p) for p in params),
                               _address(None if mask is None else mask.view(np.uint8)), _address(codes),
                               _address(errors))
            self._tail = (_address(loss), float((1 << bits) - 1))

    def columns(self, errors_row0: int, c0: int, c1: int, j2: int) -> None:
        """The positions ``c0 … c1−1`` of a sub-block that ends at ``j2``, in place.  Per position ``c``::

            a = nearest_codes(w_c);   q = s·(a − zp) + z
            e = (w_c − q) / U[c, c];   loss += e²;   w_j −= U[c, j]·e   for c < j < j2

        ``errors`` row ``c − errors_row0`` receives ``e``."""
        if _NATIVE is not None:
            _NATIVE.onnxq_gptq_columns(*self._arguments, errors_row0, *self._tail, c0, c1, j2)
            return
        work, upper, mask = self.work, self.upper, self.mask
        scales, zero_points, float_zeros, inverse_scales = self.params
        for c in range(c0, c1):
            w = work[c]
            code = nearest_codes(w, inverse_scales[c], zero_points[c], float_zeros[c], self.bits,
                                 None if mask is None else mask[c])
            self.codes[c] = code
            value = scales[c] * (code - zero_points[c]) + float_zeros[c]
            err = self.errors[c - errors_row0]
            np.subtract(w, value, out=err)
            err *= 1.0 / upper[c, c]
            self.loss += err * err
            if c + 1 < j2:
                work[c + 1 : j2] -= upper[c, c + 1 : j2, None] * err


def cd_block(
    gradient: np.ndarray,
    hessian: np.ndarray,
    i1: int,
    values: np.ndarray,
    codes: np.ndarray,
    params: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    mask: np.ndarray | None,
    diag: np.ndarray,
    moves: np.ndarray,
    change: np.ndarray,
    bits: int,
) -> None:
    """Coordinate descent over the block of columns ``i1 … i1+B−1``, in place (``B`` = ``len(gradient)``).

    All ``[B, n]`` arrays hold the block's rows: ``gradient`` ``g = (e·H)ᵀ``, ``values`` ``q``, ``codes`` (float64),
    ``params`` ``(s, zp, z, 1/s)``, ``moves`` (out).  Per column ``c``: the best code ``a`` for ``q_c − g_c/H_cc``,
    ``d = s·(a − zp) + z − q_c``, loss change ``Δ = d·(2g_c + d·H_cc)``; where ``Δ ≥ 0`` nothing moves (``d = 0``);
    ``change += Δ``, ``q_c += d``, ``moves_c = d``, and the later columns of the block see the move at once:
    ``g_j += H[c, j]·d`` for ``c < j``."""
    scales, zero_points, float_zeros, inverse_scales = params
    rows, n = gradient.shape
    if _NATIVE is not None:
        _NATIVE.onnxq_cd_block(
            _address(gradient), _address(hessian), hessian.shape[0], n, i1, i1 + rows, _address(values),
            _address(codes), _address(scales), _address(zero_points), _address(float_zeros), _address(inverse_scales),
            _address(None if mask is None else mask.view(np.uint8)), _address(diag), _address(moves),
            _address(change), float((1 << bits) - 1))
        return
    for b in range(rows):
        c = i1 + b
        g = gradient[b]
        code = nearest_codes(values[b] - g / diag[b], inverse_scales[b], zero_points[b], float_zeros[b], bits,
                             None if mask is None else mask[b])
        value = scales[b] * (code - zero_points[b]) + float_zeros[b]
        d = value - values[b]
        step = d * (2.0 * g + d * diag[b])
        keep = step >= 0  # no gain (ties, rounding noise): leave the code alone
        d[keep] = 0.0
        change += np.where(keep, 0.0, step)
        codes[b] = np.where(keep, codes[b], code)
        values[b] += d
        moves[b] = d
        if b + 1 < rows and np.any(d):
            gradient[b + 1 :] += hessian[c, c + 1 : i1 + rows, None] * d
