"""The compiled column sweeps (custom_ops/solver/sweeps.cc) against their numpy twins: the same bits, always."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.solvers import sweeps
from onnxq.solvers.decoupleq import quantize_decoupleq
from onnxq.solvers.gptq import quantize_gptq
from onnxq.solvers.hessian import layer_loss
from onnxq.solvers.rounding import GroupGrid, coordinate_descent
from tests.test_solver_decoupleq import correlated_problem

needs_native = pytest.mark.skipif(not sweeps.native(), reason="libonnxq_sweeps not built")


def test_the_install_built_the_compiled_sweeps():
    assert sweeps.LIBRARY.is_file(), f"{sweeps.LIBRARY} is missing: pip install should build it (setup.py)"
    assert sweeps.native()


def _both(run, monkeypatch):
    """``run()`` with the compiled sweeps and with the numpy ones."""
    native = run()
    monkeypatch.setattr(sweeps, "_NATIVE", None)
    twin = run()
    monkeypatch.undo()
    return native, twin


def _assert_same(a, b):
    for left, right in zip(a, b, strict=True):
        if isinstance(left, np.ndarray):
            assert left.dtype == right.dtype and left.shape == right.shape
            assert left.tobytes() == right.tobytes()
        else:
            assert left == right


@needs_native
@pytest.mark.parametrize("masked", [False, True])
def test_gptq_columns_native_equals_numpy(monkeypatch, masked):
    rng = np.random.default_rng(3)
    k, n = 40, 29
    upper = np.triu(rng.standard_normal((k, k)) * 0.1) + np.diag(rng.uniform(0.5, 2.0, k))
    scales = rng.uniform(0.05, 0.5, (k, n))
    params = (scales, rng.integers(0, 4, (k, n)).astype(np.float64), rng.standard_normal((k, n)) * 0.1, 1.0 / scales)
    mask = rng.random((k, n)) < 0.2 if masked else None
    work0 = rng.standard_normal((k, n))

    def run():
        work, codes, errors, loss = work0.copy(), np.zeros((k, n), np.uint8), np.zeros((16, n)), np.zeros(n)
        sweeps.GptqSweep(work, upper, params, mask, codes, errors, loss, 2).columns(16, 18, 27, 32)
        return work, codes, errors, loss

    native, twin = _both(run, monkeypatch)
    _assert_same(native, twin)
    assert np.any(native[1][18:27]) and not np.any(native[1][:18]) and not np.any(native[1][27:])  # only c0 … c1−1
    assert not np.array_equal(native[0][27:32], work0[27:32]) and np.array_equal(native[0][32:], work0[32:])


@needs_native
@pytest.mark.parametrize("masked", [False, True])
def test_coordinate_descent_native_equals_numpy_and_its_loss_change_is_exact(monkeypatch, masked):
    weight, hessian = correlated_problem(n=23, k=200, seed=5)  # two blocks of 128 columns
    qw = quantize_gptq(weight, hessian, 2, 32, zero_convention="float", rtn_guard=False)
    grid = GroupGrid(qw.codes, qw.scales.astype(np.float64), qw.zero_points.astype(np.float64),
                     qw.float_zeros.astype(np.float64))
    mask = np.random.default_rng(1).random(weight.shape) < 0.1 if masked else None

    native, twin = _both(lambda: coordinate_descent(weight, hessian, grid, 32, 2, mask, sweeps=2), monkeypatch)
    _assert_same(native, twin)
    codes, change = native
    assert np.any(codes != grid.codes) and np.all(change <= 0)
    before = layer_loss(weight, grid.dequantize(32), hessian)
    after = layer_loss(weight, grid.with_codes(codes).dequantize(32), hessian)
    np.testing.assert_allclose(after - before, change, rtol=1e-6, atol=1e-9 * before.max())


@needs_native
@pytest.mark.parametrize("param_dtype", [np.float32, np.float16])
def test_decoupleq_and_act_order_gptq_give_the_same_bytes_either_way(monkeypatch, param_dtype):
    weight, hessian = correlated_problem(n=45, k=192, seed=11)

    def solve():
        dq, stats = quantize_decoupleq(weight, hessian, 2, 64, param_dtype=param_dtype)
        gq = quantize_gptq(weight, hessian, 3, 64, act_order=True)  # the group fit between sweep calls
        return (dq.codes, dq.scales, dq.float_zeros, gq.codes, gq.scales, gq.zero_points, stats["raw_loss_final"])

    _assert_same(*_both(solve, monkeypatch))
