"""Memory of a layer's Hessian preparation (issue #14: a 1 B model's ``down_proj`` has ``K = 5632``, so every
``K × K`` float64 array is 0.24 GiB, in the parent that prepares it and in each solve worker)."""

from __future__ import annotations

import graphs
import numpy as np

from onnxq.calibration.keys import hessian_key
from onnxq.calibration.store import HessianStore
from onnxq.ir.targets import find_targets
from onnxq.solvers.base import DecoupleqParams, plan
from onnxq.solvers.hessian import prepare_hessian


def _hessian(k: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((k + 64, k))
    return x.T @ x


def test_undamped_loss_without_a_copy():
    """``(w − q) H (w − q)ᵀ`` with the undamped ``H``, from the damped one: equal to the definition."""
    k, n = 96, 7
    rng = np.random.default_rng(1)
    h = _hessian(k, 1)
    prepared = prepare_hessian(h, 0.1)
    weight, quantized = rng.standard_normal((n, k)), rng.standard_normal((n, k))
    error = weight - quantized
    np.testing.assert_allclose(prepared.undamped_loss(weight, quantized), np.einsum("nk,kl,nl->n", error, h, error),
                               rtol=1e-10)


def test_store_keeps_no_raw_sum_once_prepared():
    """The layers of a group share one prepared ``H``; the raw sum is dropped once it is damped and factorised."""
    model = graphs.residual_model()
    targets = find_targets(model).targets
    store = HessianStore(0.01, act_order=True)
    key = hessian_key(targets[0])
    store.update({key: _hessian(targets[0].matrix_shape[1])})
    first = store.layer_stats(targets[0])
    assert key not in store.hessians
    assert store.layer_stats(targets[0]).hessians[0] is first.hessians[0]
    tasks = plan(np.zeros((5, first.hessians[0].size)), DecoupleqParams(bits=2, group_size=8), first, None)
    assert all(task.hessian is first.hessians[0] for task in tasks)
