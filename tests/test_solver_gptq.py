"""GPTQ solver: equal to a slow textbook reference, to RTN when H = I, and exact zeros under a mask."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.errors import OnnxqError
from onnxq.quantized_weight import expand_groups
from onnxq.solvers.gptq import gptq_round, quantize_gptq
from onnxq.solvers.hessian import layer_loss, prepare_hessian
from onnxq.solvers.rtn import quantize_rtn


def correlated_problem(n: int, k: int, seed: int, rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """A weight and ``H = XᵀX`` of activations ``X = Z·M`` mixed by a random matrix (strongly correlated)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(k, k)) / np.sqrt(k) + np.diag(rng.uniform(0.2, 2.0, size=k))
    x = rng.standard_t(df=4, size=(rows, k)) @ mixing
    weight = rng.laplace(scale=0.05, size=(n, k))
    return weight, x.T @ x


def reference_gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    zero_convention: str = "integer",
    damp: float = 0.01,
    act_order: bool = False,
    zero_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Column-by-column textbook GPTQ with immediate updates; returns the codes."""
    n, k = weight.shape
    group_size = k if group_size == -1 else group_size
    levels = (1 << bits) - 1
    h = hessian + damp * np.mean(np.diag(hessian)) * np.eye(k)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    upper = np.linalg.cholesky(np.linalg.inv(h[np.ix_(order, order)])).T
    w = np.where(zero_mask, 0.0, weight) if zero_mask is not None else weight.copy()
    if zero_mask is not None:
        zero_convention = "integer"
    w = w[:, order]
    codes = np.zeros((n, k))
    params: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for c in range(k):
        col = order[c]
        g = col // group_size
        if g not in params:
            members = [np.flatnonzero(order == j)[0] for j in range(g * group_size, min((g + 1) * group_size, k))]
            values = w[:, members]
            if zero_mask is not None:
                values = np.where(zero_mask[:, g * group_size : (g + 1) * group_size], 0.0, values)
            rtn = quantize_rtn(values, bits, values.shape[1], symmetric=symmetric, zero_convention=zero_convention)
            float_zeros = np.zeros(n) if rtn.float_zeros is None else rtn.float_zeros[:, 0].astype(np.float64)
            params[g] = (rtn.scales[:, 0].astype(np.float64), rtn.zero_points[:, 0].astype(np.float64), float_zeros)
        s, zp, z = params[g]
        q = np.clip(np.round((w[:, c] - z) / s) + zp, 0, levels)
        if zero_mask is not None:
            q = np.where(zero_mask[:, col], zp, q)
        codes[:, col] = q
        err = (w[:, c] - (s * (q - zp) + z)) / upper[c, c]
        w[:, c:] -= np.outer(err, upper[c, c:])
    return codes


@pytest.mark.parametrize(
    ("bits", "group_size", "act_order", "symmetric", "zero_convention"),
    [
        (2, 32, False, False, "integer"),
        (3, 32, True, False, "integer"),
        (4, -1, False, False, "float"),
        (4, 24, True, True, "integer"),
        (8, 64, True, False, "float"),
    ],
)
def test_gptq_matches_textbook_reference(
    bits: int, group_size: int, act_order: bool, symmetric: bool, zero_convention: str
) -> None:
    weight, hessian = correlated_problem(n=24, k=100, seed=bits + group_size)
    qw = quantize_gptq(
        weight,
        hessian,
        bits,
        group_size,
        symmetric=symmetric,
        zero_convention=zero_convention,
        act_order=act_order,
        block_size=16,  # several lazy blocks, group boundaries inside blocks
        rtn_guard=False,  # the algorithm itself, code for code (the guard has its own test)
    )
    expected = reference_gptq(weight, hessian, bits, group_size, symmetric, zero_convention, act_order=act_order)
    assert np.array_equal(qw.codes, expected)
    assert qw.codes.max() <= (1 << bits) - 1


def test_gptq_block_size_does_not_change_the_result() -> None:
    weight, hessian = correlated_problem(n=16, k=90, seed=3)
    a = quantize_gptq(weight, hessian, 3, 32, act_order=True, block_size=7)
    b = quantize_gptq(weight, hessian, 3, 32, act_order=True, block_size=128)
    assert np.array_equal(a.codes, b.codes)
    np.testing.assert_allclose(a.scales, b.scales, rtol=1e-6)


@pytest.mark.parametrize(("symmetric", "zero_convention"), [(False, "integer"), (False, "float"), (True, "integer")])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_gptq_with_identity_hessian_is_rtn(symmetric: bool, zero_convention: str, group_size: int) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(32, 70))
    qw = quantize_gptq(weight, np.eye(70), 3, group_size, symmetric=symmetric, zero_convention=zero_convention)
    rtn = quantize_rtn(weight, 3, group_size, symmetric=symmetric, zero_convention=zero_convention)
    assert np.array_equal(qw.codes, rtn.codes)
    assert np.array_equal(qw.scales, rtn.scales)
    assert np.array_equal(qw.zero_points, rtn.zero_points)
    assert (qw.float_zeros is None) == (rtn.float_zeros is None)


def test_gptq_beats_rtn_on_correlated_hessian() -> None:
    weight, hessian = correlated_problem(n=64, k=128, seed=1)
    for bits in (2, 3, 4):
        gptq = layer_loss(weight, quantize_gptq(weight, hessian, bits, 32).dequantize(np.float64), hessian).sum()
        rtn = layer_loss(weight, quantize_rtn(weight, bits, 32).dequantize(np.float64), hessian).sum()
        assert gptq < 0.8 * rtn


def test_gptq_zero_mask_entries_dequantize_to_exact_zero() -> None:
    weight, hessian = correlated_problem(n=20, k=80, seed=5)
    mask = weight < np.quantile(weight, 0.6)  # like an upper SplitQuant branch
    branch = np.where(mask, 0.0, weight)
    qw = quantize_gptq(branch, hessian, 2, 32, zero_convention="float", zero_mask=mask, act_order=True,
                       rtn_guard=False)
    assert qw.float_zeros is None
    deq = qw.dequantize(np.float32)
    assert np.all(deq[mask] == 0.0)
    assert np.array_equal(qw.codes, reference_gptq(branch, hessian, 2, 32, act_order=True, zero_mask=mask))
    zp = expand_groups(qw.zero_points, 80, 32)
    assert np.array_equal(qw.codes[mask], zp[mask])


def test_dead_columns_and_zero_hessian() -> None:
    weight, hessian = correlated_problem(n=8, k=40, seed=2)
    hessian[:, 5] = 0.0
    hessian[5, :] = 0.0
    qw = quantize_gptq(weight, hessian, 4, 16)
    assert np.all(np.isfinite(qw.dequantize()))
    # a dead column has no coupling: it is rounded to nearest on its group's grid
    s, zp = qw.scales[:, 0].astype(np.float64), qw.zero_points[:, 0].astype(np.float64)
    deq5 = s * (qw.codes[:, 5] - zp)
    assert np.all(np.abs(deq5 - weight[:, 5]) <= 0.5 * s + 1e-7)
    zero = quantize_gptq(weight, np.zeros((40, 40)), 4, 16)
    assert np.array_equal(zero.codes, quantize_rtn(weight, 4, 16).codes)


def test_damping_is_raised_when_cholesky_fails() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 30))
    hessian = x.T @ x - 0.5 * np.mean(np.diag(x.T @ x)) * np.eye(30)  # indefinite
    prepared = prepare_hessian(hessian, damp=0.01)
    assert prepared.damp >= 1.0
    assert np.all(np.linalg.eigvalsh(prepared.damped) > 0)
    upper = prepared.inverse_cholesky_upper()
    np.testing.assert_allclose(upper.T @ upper, np.linalg.inv(prepared.damped), rtol=1e-8, atol=1e-10)
    qw = quantize_gptq(rng.normal(size=(4, 30)), hessian, 4, -1)
    assert np.all(np.isfinite(qw.dequantize()))


def test_gptq_user_errors() -> None:
    weight = np.zeros((4, 10))
    with pytest.raises(OnnxqError, match="Hessian is"):
        quantize_gptq(weight, np.eye(12), 4)
    with pytest.raises(OnnxqError, match="zero_mask"):
        quantize_gptq(weight, np.eye(10), 4, zero_mask=np.zeros((4, 9), dtype=bool))
    with pytest.raises(OnnxqError, match="bits"):
        quantize_gptq(weight, np.eye(10), 5)
    with pytest.raises(OnnxqError, match="NaN"):
        quantize_gptq(weight, np.full((10, 10), np.nan), 4)


@pytest.mark.parametrize("float32_blocks", [False, True])
def test_gptq_sweep_reports_the_damped_loss(float32_blocks: bool) -> None:
    """``w − q = e·U`` and ``U H_d Uᵀ = I``: the sum of squared scaled errors is the damped loss (to float32's
    precision when the errors reach later blocks through float32 products)."""
    weight, hessian = correlated_problem(n=12, k=72, seed=8)
    prepared = prepare_hessian(hessian, act_order=True)
    order = prepared.act_order()
    start = quantize_rtn(weight, 3, 24, zero_convention="float")
    groups = start.num_groups
    upper = prepared.inverse_cholesky_upper(order)
    codes, loss = gptq_round(
        weight,
        upper,
        3,
        24,
        start.scales.astype(np.float64),
        np.full((12, groups), 4.0),
        start.float_zeros.astype(np.float64),
        order=order,
        block_size=32,
        float32_propagation=float32_blocks,
    )
    deq = expand_groups(start.scales.astype(np.float64), 72, 24) * (codes - 4.0) + expand_groups(
        start.float_zeros.astype(np.float64), 72, 24
    )
    np.testing.assert_allclose(loss, layer_loss(weight, deq, prepared.damped), rtol=1e-5 if float32_blocks else 1e-9)
