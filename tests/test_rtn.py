"""RTN solver: grid facts that could fail (range, exact endpoints, symmetric zero, clip search)."""

import numpy as np
import pytest

from onnxq.solvers.rtn import quantize_rtn


@pytest.fixture
def weight():
    return np.random.default_rng(0).standard_normal((16, 200)) * np.linspace(0.1, 3, 200)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_codes_in_range_and_error_bounded(weight, bits, group_size):
    qw = quantize_rtn(weight, bits, group_size)
    assert qw.codes.max() <= (1 << bits) - 1 and qw.codes.dtype == np.uint8
    assert qw.group_size == (200 if group_size == -1 else group_size)
    # RTN with an integer zero point errs by at most one step per entry (half a step + zero-point rounding)
    step = np.repeat(qw.scales, qw.group_size, axis=1)[:, :200]
    assert np.all(np.abs(qw.dequantize(np.float64) - weight) <= step * 1.0 + 1e-12)


def test_float_zero_reproduces_group_min_and_max_exactly(weight):
    qw = quantize_rtn(weight, 4, 50, zero_convention="float")
    deq = qw.dequantize(np.float64).reshape(16, 4, 50)
    grouped = weight.reshape(16, 4, 50)
    np.testing.assert_allclose(deq.min(axis=2), grouped.min(axis=2), rtol=1e-6)
    np.testing.assert_allclose(deq.max(axis=2), grouped.max(axis=2), rtol=1e-6)


def test_symmetric_represents_zero_exactly(weight):
    w = weight.copy()
    w[:, ::7] = 0.0
    qw = quantize_rtn(w, 3, 64, symmetric=True)
    assert np.all(qw.dequantize(np.float64)[:, ::7] == 0.0)
    assert np.all(qw.zero_points == 4)


def test_integer_zero_point_keeps_exact_zeros(weight):
    w = weight.copy()
    w[w > 0.3] = 0.0  # a SplitQuant-like branch: zeros inside the range
    qw = quantize_rtn(w, 2, -1)
    assert np.all(qw.dequantize(np.float64)[w == 0] == 0.0)


def test_clip_search_never_increases_error(weight):
    for bits in (2, 3, 4):
        plain = np.square(quantize_rtn(weight, bits, 64).dequantize(np.float64) - weight).sum()
        searched = np.square(quantize_rtn(weight, bits, 64, clip_search=True).dequantize(np.float64) - weight).sum()
        assert searched <= plain
    assert searched < 0.97 * plain  # and on Gaussian-like weights it helps at low bits


def test_constant_group_is_exact():
    w = np.full((2, 64), 0.25)
    for zero_convention in ("integer", "float"):
        qw = quantize_rtn(w, 2, 32, zero_convention=zero_convention)
        np.testing.assert_allclose(qw.dequantize(np.float64), w, rtol=1e-7)
