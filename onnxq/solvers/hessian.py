"""Damping and factorisation of a layer Hessian ``H = Σ xᵀx`` (``[K, K]``, float64).

The quadratic loss of a quantized weight row ``q`` against ``w`` is ``(w − q) H (w − q)ᵀ``.  Before it is used,
``H`` is symmetrised and damped, ``H_d = H + λ·mean(diag H)·I``; when a Cholesky factorisation fails, ``λ`` is
raised ×10 until it succeeds.  A dead column (``H_kk = 0``, an input that was always zero in calibration) keeps
only the damping term, so its weights are simply rounded to nearest.

decoupleQ ranks its candidates by :func:`ranking_loss`, the same loss with the ``K × K`` product in float32 (``H_d``
rounded once per solve) and the per-row sums in float64: about 2.6× faster than float64 here, and off by ≈ 1e-6
relative, far below the differences between 2-bit candidates.  What a solve reports and the RTN guard compare
(:func:`layer_loss`, :meth:`PreparedHessian.undamped_loss`) stay float64.

GPTQ needs the upper Cholesky factor ``U`` of ``H_d⁻¹`` (``H_d⁻¹ = UᵀU``), in a chosen column order.  It is
computed without forming the inverse: with ``J`` the reversal permutation and ``J H_d J = L Lᵀ`` (lower ``L``),
``H_d = R Rᵀ`` for the upper-triangular ``R = J L J``, hence ``H_d⁻¹ = R⁻ᵀ R⁻¹`` and ``U = R⁻¹ = J L⁻¹ J``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import scipy.linalg

from onnxq.errors import OnnxqError
from onnxq.quantized_weight import QuantizedWeight, select_rows

MAX_DAMP_RAISES = 8


@dataclass(frozen=True)
class PreparedHessian:
    """A damped Hessian plus cached GPTQ factors; share one between layers that read the same input."""

    damped: np.ndarray  # float64 [K, K], symmetric positive definite
    damp: float  # the λ actually used (may exceed the requested one)
    dead: np.ndarray  # bool [K], columns with H_kk = 0 before damping
    shift: float  # λ·mean(diag H), added to the diagonal
    _upper_cache: dict[bytes, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return self.damped.shape[0]

    def undamped_loss(self, weight: np.ndarray, qweight_dequant: np.ndarray) -> np.ndarray:
        """Per output channel ``diag((W − Q) H (W − Q)ᵀ)`` with the undamped ``H``, as
        ``(w − q) H_d (w − q)ᵀ − μ‖w − q‖²`` (``μ`` the damping shift): no ``K × K`` copy of ``H`` is made."""
        error = np.asarray(weight, dtype=np.float64) - np.asarray(qweight_dequant, dtype=np.float64)
        return np.einsum("nk,nk->n", error @ self.damped, error) - self.shift * np.einsum("nk,nk->n", error, error)

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``H_d⁻¹·rhs`` (float64 ``[K, m]``) through a cached factor, no new factorisation: with ``UᵀU = (P H_d Pᵀ)⁻¹``
        for the factor's column order ``P``, ``H_d⁻¹ = Pᵀ·UᵀU·P``, two triangular products."""
        if not self._upper_cache:
            self.inverse_cholesky_upper()
        key, upper = next(iter(self._upper_cache.items()))
        order = np.frombuffer(key, dtype=np.int64) if key else None
        rhs = np.asarray(rhs, dtype=np.float64)
        permuted = np.ascontiguousarray(rhs if order is None else rhs[order])
        lower = upper.T  # a Fortran-ordered view of Uᵀ: BLAS reads it without a copy
        # transposed, as BLAS wants Fortran order: (UᵀU·B)ᵀ = Bᵀ·Uᵀ·U
        product = scipy.linalg.blas.dtrmm(1.0, lower, permuted.T, side=1, lower=1)
        product = scipy.linalg.blas.dtrmm(1.0, lower, product, side=1, lower=1, trans_a=1, overwrite_b=1).T
        if order is None:
            return np.ascontiguousarray(product)
        solved = np.empty_like(product)
        solved[order] = product
        return solved

    def act_order(self) -> np.ndarray:
        """Column order by decreasing ``diag H`` (stable, so ties keep their original order)."""
        return np.argsort(-np.diag(self.damped), kind="stable")

    def inverse_cholesky_upper(self, order: np.ndarray | None = None) -> np.ndarray:
        """Upper ``U`` with ``UᵀU = (P H_d Pᵀ)⁻¹`` for the column order ``order`` (identity if None)."""
        key = _order_key(order)
        if key not in self._upper_cache:
            h = self.damped if order is None else self.damped[np.ix_(order, order)]
            upper = _inverse_cholesky_upper(h)
            if upper is None:
                raise OnnxqError(
                    "Hessian factorisation failed after damping: the calibration statistics are degenerate; "
                    "use more calibration data or a larger damping (damp)"
                )
            self._upper_cache[key] = upper
        return self._upper_cache[key]


def prepare_hessian(
    hessian: np.ndarray | PreparedHessian, damp: float = 0.01, act_order: bool = False
) -> PreparedHessian:
    """Symmetrise and damp ``H`` (``H + λ·mean(diag H)·I``), raising ``λ`` ×10 until Cholesky succeeds.

    The factor ``U`` for the order GPTQ will use (act-order or natural) is computed and cached on the way.
    """
    if isinstance(hessian, PreparedHessian):
        return hessian
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise OnnxqError(f"Hessian must be a square [K, K] matrix, got shape {h.shape}; pass Σ xᵀx of the layer input")
    if not np.all(np.isfinite(h)):
        raise OnnxqError("Hessian contains NaN or Inf; check the calibration inputs for non-finite activations")
    if damp <= 0:
        raise OnnxqError(f"damp must be > 0, got {damp}; use e.g. 0.01")
    h = (h + h.T) * 0.5
    diag = np.diag(h).copy()
    dead = diag <= 0
    mean_diag = float(np.mean(np.where(dead, 0.0, diag)))
    if mean_diag <= 0:  # no information at all: plain mean squared error
        h = np.eye(h.shape[0])
        mean_diag = 1.0
    lam = float(damp)
    for _ in range(MAX_DAMP_RAISES):
        damped = h.copy()
        damped[np.diag_indices_from(damped)] += lam * mean_diag
        prepared = PreparedHessian(damped=damped, damp=lam, dead=dead, shift=lam * mean_diag)
        order = prepared.act_order() if act_order else None
        upper = _inverse_cholesky_upper(damped if order is None else damped[np.ix_(order, order)])
        if upper is not None:
            prepared._upper_cache[_order_key(order)] = upper
            return prepared
        lam *= 10.0
    raise OnnxqError(
        f"Hessian is not positive definite even with damping {lam / 10:g}; the calibration data is degenerate"
    )


def _order_key(order: np.ndarray | None) -> bytes:
    return b"" if order is None else np.asarray(order, dtype=np.int64).tobytes()


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray | None:
    """``U`` upper with ``UᵀU = h⁻¹`` (``U = J L⁻¹ J``, ``J h J = L Lᵀ``); None if ``h`` is not numerically PD."""
    try:
        lower = scipy.linalg.cholesky(h[::-1, ::-1], lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    inv_lower, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
    if info != 0 or not np.all(np.isfinite(inv_lower)) or np.any(np.diag(inv_lower) <= 0):
        return None
    return np.ascontiguousarray(inv_lower[::-1, ::-1])


def layer_loss(weight: np.ndarray, qweight_dequant: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Per output channel ``diag((W − Q) H (W − Q)ᵀ)`` (float64 ``[N]``)."""
    error = np.asarray(weight, dtype=np.float64) - np.asarray(qweight_dequant, dtype=np.float64)
    return np.einsum("nk,nk->n", error @ np.asarray(hessian, dtype=np.float64), error)


def ranking_loss(weight: np.ndarray, qweight_dequant: np.ndarray, hessian32: np.ndarray) -> np.ndarray:
    """Per output channel ``diag((W − Q) H (W − Q)ᵀ)`` with the ``[N, K] × [K, K]`` product in float32 (``hessian32``)
    and the row sums in float64 (float64 ``[N]``): for ranking candidates, not for reporting."""
    error = (np.asarray(weight, dtype=np.float64) - np.asarray(qweight_dequant, dtype=np.float64)).astype(np.float32)
    return np.einsum("nk,nk->n", error @ hessian32, error, dtype=np.float64)


class Guarded(NamedTuple):
    """:func:`no_worse_than`'s result: the weight, the rows taken from the reference, and both per-row losses."""

    weight: QuantizedWeight
    taken: np.ndarray  # bool [N]
    loss_reference: np.ndarray  # [N]
    loss: np.ndarray  # [N], of ``weight``


def no_worse_than(
    weight: np.ndarray, hessian: PreparedHessian, solved: QuantizedWeight, reference: QuantizedWeight
) -> Guarded:
    """``solved`` with each row whose loss ``(w − q) H (w − q)ᵀ`` (undamped ``H``) exceeds ``reference``'s replaced
    by that row.

    Rows are independent in the layer loss, so the result is never worse than either input, row by row."""
    solved_loss = hessian.undamped_loss(weight, solved.dequantize(np.float64))
    reference_loss = hessian.undamped_loss(weight, reference.dequantize(np.float64))
    worse = solved_loss > reference_loss
    result = select_rows(worse, solved, reference) if worse.any() else solved
    return Guarded(result, worse, reference_loss, np.where(worse, reference_loss, solved_loss))


def float_output_target(weight: np.ndarray, hessian: PreparedHessian, cross: np.ndarray) -> np.ndarray:
    """The weight ``W̃`` whose H-weighted distance to ``Q`` is the float-output error of ``Q`` (asymmetric
    calibration, sequential mode).

    With ``X`` the layer's inputs in the partially quantized model, ``X_f`` the same inputs in the float model,
    ``H = XᵀX``, ``C = XᵀX_f`` and the damping ``μ = λ·mean(diag H)`` (``H_d = H + μI``), every row ``q`` of ``Q``
    has ``‖X qᵀ − X_f wᵀ‖² + μ‖q − w‖² = (q − w̃) H_d (q − w̃)ᵀ + const`` for ``w̃ᵀ = H_d⁻¹ (C + μI) wᵀ``,
    so the solvers, given ``W̃``, fit the quantized layer on quantized inputs to the float layer on float inputs.
    ``W̃ = W`` when ``X = X_f``.
    """
    w = np.asarray(weight, dtype=np.float64)
    return hessian.solve(np.asarray(cross, dtype=np.float64) @ w.T + hessian.shift * w.T).T
