"""The float step of decoupleQ: least-squares scales (and zeros) per group for fixed integer codes.

For one row ``w`` with integers ``a`` and ``q_k = s_g·a_k + z_g``, ``q = A·θ`` with ``A = [a∘E | E]`` (``E`` the
``K×G`` group indicator, ``θ = (s_1…s_G, z_1…z_G)``), or ``A = a∘E`` when the zeros are fixed at 0.  The loss
``ℓ(θ) = (w − Aθ) H (w − Aθ)ᵀ`` is minimised by the normal equations ``AᵀHA·θ = AᵀH·wᵀ``, a ``2G×2G`` system per
row, built for all rows at once from ``G`` BLAS products ``a_g·H[g, g:]`` (the blocks on and above the diagonal, the
others by symmetry; in float32 when built with ``hessian32``) and solved by batched LU in float64.  A tiny
Levenberg–Marquardt ridge toward the current ``θ`` keeps unidentifiable parameters (e.g. of a constant group) where
they are.  The loss of any ``θ`` follows from the same quantities:
``ℓ(θ) = wHwᵀ − 2θᵀAᵀHwᵀ + θᵀAᵀHAθ``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

RIDGE = 1e-10  # relative ridge: θ = (M + εD)⁻¹(r + εDθ₀), D = diag(M)


@dataclass(frozen=True)
class ScaleLeastSquares:
    """Normal equations of the float step for one weight ``[n, K]`` and Hessian (the parts that do not change)."""

    k: int
    group_size: int
    groups: int
    h_products: np.ndarray  # H zero-padded to whole groups, in the precision of the products a_g·H[g, :]
    h_group_sums: np.ndarray  # [K_pad, G]: Σ_{l∈h} H_kl
    m22: np.ndarray  # [G, G]: Σ_{k∈g, l∈h} H_kl
    hw_pad: np.ndarray  # per row: w·H, padded
    whw: np.ndarray  # per row: w·H·wᵀ

    @classmethod
    def build(
        cls, target: np.ndarray, hessian: np.ndarray, group_size: int, hessian32: np.ndarray | None = None
    ) -> ScaleLeastSquares:
        """The equations of ``target`` ``[n, K]`` under ``hessian``; with ``hessian32`` (``H`` in float32) the
        per-fit products ``a_g·H[g, :]`` run in float32 (the ranking precision of :mod:`onnxq.solvers.hessian`)."""
        n, k = target.shape
        groups = -(-k // group_size)
        padded = groups * group_size
        h_pad = _padded(hessian, padded)
        h_group_sums = h_pad.reshape(padded, groups, group_size).sum(axis=2)
        h_products = h_pad if hessian32 is None else _padded(hessian32, padded)
        hw = target @ hessian
        hw_pad = np.zeros((n, padded))
        hw_pad[:, :k] = hw
        return cls(k, group_size, groups, h_products, h_group_sums,
                   h_group_sums.reshape(groups, group_size, groups).sum(axis=1), hw_pad,
                   np.einsum("nk,nk->n", hw, target))

    def rows(self, index: np.ndarray) -> ScaleLeastSquares:
        """The same equations for the rows ``index`` of the target (the Hessian parts are shared, not copied)."""
        return replace(self, hw_pad=self.hw_pad[index], whw=self.whw[index])

    def fit(
        self,
        ints: np.ndarray,
        scales: np.ndarray,
        float_zeros: np.ndarray | None,
        storage: np.dtype | type = np.float32,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Solve for ``(s, z)`` given integers ``a`` ``[n, K]`` (``z ≡ 0`` when ``float_zeros`` is None).

        Returns the new scales and float_zeros rounded to ``storage`` (float64 arrays holding values it represents,
        as they are stored), the loss of that stored ``θ`` and the loss of the current one, both from the same
        formula.
        """
        n = ints.shape[0]
        groups, group_size = self.groups, self.group_size
        padded = groups * group_size
        with_float_zeros = float_zeros is not None
        a_pad = np.zeros((n, padded))
        a_pad[:, : self.k] = ints
        a_products = a_pad.astype(self.h_products.dtype, copy=False)  # integers: exact in float32
        a_products3 = a_products.reshape(n, groups, group_size)
        a3 = a_pad.reshape(n, groups, group_size)
        hw3 = self.hw_pad.reshape(n, groups, group_size)
        rhs = np.einsum("ngj,ngj->ng", a3, hw3)
        theta0 = np.asarray(scales, dtype=np.float64)
        if with_float_zeros:
            rhs = np.concatenate([rhs, hw3.sum(axis=2)], axis=1)
            theta0 = np.concatenate([theta0, float_zeros], axis=1)
        size = rhs.shape[1]
        system = np.empty((n, size, size))
        for g in range(groups):  # the blocks h ≥ g of Σ_{k∈g, l∈h} a_k H_kl a_l; the others by symmetry
            cols = slice(g * group_size, (g + 1) * group_size)
            products = np.ascontiguousarray(a_products[:, cols]) @ self.h_products[cols, cols.start :]
            system[:, g, g:groups] = np.einsum("ngj,ngj->ng", products.reshape(n, groups - g, group_size),
                                               a_products3[:, g:])
            if with_float_zeros:
                system[:, g, groups:] = np.ascontiguousarray(a_pad[:, cols]) @ self.h_group_sums[cols, :]
        upper_rows, upper_cols = np.triu_indices(groups, 1)
        system[:, upper_cols, upper_rows] = system[:, upper_rows, upper_cols]
        if with_float_zeros:
            system[:, groups:, :groups] = system[:, :groups, groups:].transpose(0, 2, 1)
            system[:, groups:, groups:] = self.m22

        def loss(theta: np.ndarray) -> np.ndarray:
            return self.whw - 2.0 * np.einsum("ni,ni->n", theta, rhs) + np.einsum("ni,nij,nj->n", theta, system, theta)

        current_loss = loss(theta0)
        diag = np.diagonal(system, axis1=1, axis2=2)
        floor = np.maximum(diag.mean(axis=1, keepdims=True), 1e-300) * 1e-6
        ridge = RIDGE * np.maximum(diag, floor)
        regularised = system.copy()
        regularised[:, np.arange(size), np.arange(size)] += ridge
        theta = np.linalg.solve(regularised, (rhs + ridge * theta0)[..., None])[..., 0]
        theta = theta.astype(storage).astype(np.float64)
        bad = ~np.all(np.isfinite(theta), axis=1)
        theta[bad] = theta0[bad]
        candidate_loss = loss(theta)
        if with_float_zeros:
            return theta[:, :groups], theta[:, groups:], candidate_loss, current_loss
        return theta, np.zeros_like(theta), candidate_loss, current_loss


def _padded(matrix: np.ndarray, size: int) -> np.ndarray:
    """``matrix`` zero-padded to ``[size, size]`` (itself, read only, when it has that size: no copy)."""
    if matrix.shape[0] == size:
        return matrix
    padded = np.zeros((size, size), dtype=matrix.dtype)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    return padded


def fit_float_params(
    target: np.ndarray,
    ints: np.ndarray,
    hessian: np.ndarray,
    group_size: int,
    scales: np.ndarray,
    float_zeros: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``(s, z)`` per row and group for fixed integers ``a`` (``z = 0`` when ``float_zeros`` is None).

    ``scales``/``float_zeros`` (``[n, G]``) are the current values the ridge pulls unidentifiable parameters toward.
    """
    least_squares = ScaleLeastSquares.build(np.asarray(target, np.float64), np.asarray(hessian, np.float64), group_size)
    new_scales, new_float_zeros, _, _ = least_squares.fit(np.asarray(ints, np.float64), scales, float_zeros)
    return new_scales, new_float_zeros
