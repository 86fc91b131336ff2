"""The one grid rule: no weight is clipped by round-to-nearest, and the Hessian solvers are never worse than RTN.

Property tests (hypothesis) over groups that are all-positive, all-negative, constant, all-zero, mixed, tiny or
huge, at every bit width, both zero conventions, sym and asym, and group sizes that do not divide K.  Derandomized,
so CI explores the same examples every run; run with ``--hypothesis-seed=random`` (and without derandomize) to
explore new ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.quantized_weight import expand_groups
from onnxq.solvers.decoupleq import quantize_decoupleq
from onnxq.solvers.gptq import quantize_gptq
from onnxq.solvers.grid import minmax_grid, off_grid
from onnxq.solvers.hessian import layer_loss
from onnxq.solvers.rtn import quantize_rtn

BITS = (2, 3, 4, 8)
KINDS = ("mixed", "positive", "negative", "constant", "zero", "tiny", "huge", "one-outlier")


def make_weight(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """A float32-representable ``[n, k]`` weight of one family (returned as float64)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, k))
    values = {
        "mixed": base,
        "positive": np.abs(base) + rng.uniform(0.0, 3.0, (n, 1)),
        "negative": -(np.abs(base) + rng.uniform(0.0, 3.0, (n, 1))),
        "constant": np.repeat(rng.standard_normal((n, 1)), k, axis=1),
        "zero": np.zeros((n, k)),
        "tiny": base * 1e-38,  # float32 subnormal range
        "huge": base * 1e37,
        "one-outlier": np.where(rng.random((n, k)) < 0.05, 1e3, np.abs(base)),
    }[kind]
    return values.astype(np.float32).astype(np.float64)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(KINDS),
    bits=st.sampled_from(BITS),
    n=st.integers(1, 6),
    k=st.integers(1, 40),
    group_size=st.one_of(st.just(-1), st.integers(1, 48)),
    symmetric=st.booleans(),
    zero_convention=st.sampled_from(["integer", "float"]),
    seed=st.integers(0, 2**16),
)
def test_rtn_is_within_half_a_step_of_every_weight(kind, bits, n, k, group_size, symmetric, zero_convention, seed):
    weight = make_weight(kind, n, k, seed)
    qw = quantize_rtn(weight, bits, group_size, symmetric, zero_convention)
    step = np.abs(expand_groups(qw.scales.astype(np.float64), k, qw.group_size))
    assert np.all(np.isfinite(step)) and np.all(step > 0)
    assert not off_grid(weight, qw).any()
    error = np.abs(qw.dequantize(np.float64) - weight)
    # the same bound written out: half a step, plus the float32 precision of the weight itself
    assert np.all(error <= 0.5 * step + 4 * np.finfo(np.float32).eps * (np.abs(weight) + np.abs(weight).max()))
    if not symmetric and zero_convention == "integer":
        assert np.all(qw.dequantize(np.float64)[weight == 0] == 0)  # 0 is on every integer-zero grid


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(KINDS),
    bits=st.sampled_from(BITS),
    symmetric=st.booleans(),
    zero_convention=st.sampled_from(["integer", "float"]),
    seed=st.integers(0, 2**16),
)
def test_float16_scales_keep_the_bound(kind, bits, symmetric, zero_convention, seed):
    """Scales rounded to float16 (fp16 models) before the codes: the bound holds in the stored parameters."""
    weight = make_weight(kind if kind not in ("tiny", "huge") else "mixed", 3, 20, seed)
    weight = weight.astype(np.float16).astype(np.float64)
    qw = quantize_rtn(weight, bits, 8, symmetric, zero_convention, scale_dtype=np.float16)
    assert np.array_equal(qw.scales, qw.scales.astype(np.float16).astype(np.float32))
    assert not off_grid(weight, qw, np.float16).any()


@pytest.mark.parametrize("bits", BITS)
def test_one_signed_group_keeps_its_whole_range(bits):
    """The bug this file was written for: min > 0 gave zp = 0 and a grid [0, max − min] that cut the top."""
    lo, hi = np.array([[0.5]]), np.array([[1.5]])
    scales, zero_points, float_zeros = minmax_grid(lo, hi, bits)
    top = scales * ((1 << bits) - 1 - zero_points) + float_zeros
    assert zero_points[0, 0] == 0 and top[0, 0] >= 1.5 - scales[0, 0] / 2
    lo, hi = np.array([[-1.5]]), np.array([[-0.5]])
    scales, zero_points, float_zeros = minmax_grid(lo, hi, bits)
    assert zero_points[0, 0] == (1 << bits) - 1 and -scales[0, 0] * zero_points[0, 0] <= -1.5 + scales[0, 0] / 2


def test_symmetric_grid_covers_the_other_side():
    """±1 at 2 bits: the old rule (s = 1/2, codes −2..1) left +1 a whole step away."""
    weight = np.array([[-1.0, 1.0, 0.25, -0.5]])
    qw = quantize_rtn(weight, 2, -1, symmetric=True)
    assert np.max(np.abs(qw.dequantize(np.float64) - weight)) <= abs(qw.scales[0, 0]) / 2 + 1e-7


def correlated_hessian(k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=3, size=(4 * k, k)) @ (rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k))
    return x.T @ x


HESSIAN_CASES = {  # a weight family, bits, K, group size and seed for the H-weighted comparisons with RTN
    "kind": st.sampled_from(("mixed", "positive", "negative", "constant", "one-outlier")),
    "bits": st.sampled_from(BITS),
    "k": st.integers(2, 40),
    "group_size": st.sampled_from([-1, 4, 7, 16]),
    "seed": st.integers(0, 2**16),
}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    **HESSIAN_CASES,
    symmetric=st.booleans(),
    zero_convention=st.sampled_from(["integer", "float"]),
    act_order=st.booleans(),
)
def test_gptq_loss_never_worse_than_rtn(kind, bits, k, group_size, symmetric, zero_convention, act_order, seed):
    weight = make_weight(kind, 5, k, seed)
    hessian = correlated_hessian(k, seed)
    gptq = quantize_gptq(weight, hessian, bits, group_size, symmetric, zero_convention, act_order=act_order)
    rtn = quantize_rtn(weight, bits, group_size, symmetric, zero_convention)
    assert np.all(layer_loss(weight, gptq.dequantize(np.float64), hessian)
                  <= layer_loss(weight, rtn.dequantize(np.float64), hessian) * (1 + 1e-9) + 1e-300)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(**HESSIAN_CASES)
def test_decoupleq_loss_never_worse_than_rtn(kind, bits, k, group_size, seed):
    weight = make_weight(kind, 5, k, seed)
    hessian = correlated_hessian(k, seed)
    solved, _ = quantize_decoupleq(weight, hessian, bits, group_size, iters=2)
    rtn = quantize_rtn(weight, bits, group_size, zero_convention="float")
    assert np.all(layer_loss(weight, solved.dequantize(np.float64), hessian)
                  <= layer_loss(weight, rtn.dequantize(np.float64), hessian) * (1 + 1e-9) + 1e-300)
