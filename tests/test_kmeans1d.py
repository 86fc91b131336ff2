"""1-D k-means: the exact DP equals brute force on tiny inputs and is never worse than scikit-learn's KMeans."""

import itertools
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from models.cache import cache_root
from onnxq.solvers import kmeans1d
from onnxq.solvers.kmeans1d import (
    assign,
    clustering_of_row,
    kmeans_1d,
    kmeans_1d_rows,
    partition_loss,
)

DATA = Path(__file__).resolve().parents[1] / "onnxq" / "data"


def minilm_path() -> Path:
    """The MiniLM export; skipped when absent, except in CI (``CI`` set) where it must have been built."""
    path = cache_root() / "minilm" / "model.onnx"
    if not path.exists():
        message = f"{path} missing: run python -m models.minilm"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def brute_force_loss(values: np.ndarray, k: int) -> float:
    """Least loss over every labelling of the values (no contiguity assumed): Σx² − Σ_c (Σ_c x)²/n_c."""
    labellings = np.array(list(itertools.product(range(k), repeat=len(values))))
    onehot = labellings[:, :, None] == np.arange(k)
    counts = onehot.sum(axis=1)
    sums = np.einsum("mnk,n->mk", onehot, values)
    between = np.divide(sums**2, counts, out=np.zeros_like(sums), where=counts > 0).sum(axis=1)
    return float(np.sum(values**2) - between.max())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-6, 6), min_size=3, max_size=8), st.integers(2, 4))
def test_exact_equals_brute_force_on_small_integers(values, k):
    values = np.array(values, dtype=np.float64) / 3
    if np.unique(values).size < k:
        return
    clustering = kmeans_1d(values, k)
    assert clustering.loss == pytest.approx(brute_force_loss(values, k), rel=1e-9, abs=1e-12)
    assert np.all(np.diff(clustering.centres) > 0)


@pytest.mark.parametrize("seed", range(8))
def test_exact_equals_brute_force_on_random_floats(seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(int(rng.integers(3, 9))) * rng.uniform(0.1, 10)
    assert kmeans_1d(values, 3).loss == pytest.approx(brute_force_loss(values, 3), rel=1e-9)


def test_boundaries_are_midpoints_and_labels_follow_them():
    values = np.array([-5.0, -4.0, 0.0, 0.5, 1.0, 9.0, 10.0])
    clustering = kmeans_1d(values, 3)
    np.testing.assert_allclose(clustering.centres, [-4.5, 0.5, 9.5])
    np.testing.assert_allclose(clustering.boundaries, [-2.0, 5.0])
    np.testing.assert_array_equal(clustering.labels(values), [0, 0, 1, 1, 1, 2, 2])
    assert clustering.loss == pytest.approx(partition_loss(values, clustering.labels(values), 3))
    assert clustering.loss == pytest.approx(0.5 + 0.5 + 0.5, rel=1e-12)  # each cluster: two values ±0.5 off
    np.testing.assert_array_equal(assign(np.array([-2.0, -1.999, 5.0, 5.001]), clustering.boundaries), [0, 1, 1, 2])


def heavy_tailed(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.standard_normal(n - n // 20) * 0.05, rng.standard_t(2, n // 20) * 0.3])


@pytest.mark.parametrize("seed", range(4))
def test_exact_is_never_worse_than_sklearn_on_random_values(seed):
    values = heavy_tailed(3000, seed)
    exact = kmeans_1d(values, 3, "exact")
    reference = kmeans_1d(values, 3, "sklearn", seed=seed)
    assert exact.loss <= reference.loss * (1 + 1e-9)


@pytest.mark.parametrize("model", ["digits_mlp", "digits_cnn"])
def test_exact_is_never_worse_than_sklearn_on_real_weights(model):
    graph = onnx.load(str(DATA / f"{model}.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) >= 2]
    assert weights
    for weight in weights:
        exact = kmeans_1d(weight, 3, "exact")
        reference = kmeans_1d(weight, 3, "sklearn")
        assert exact.loss <= reference.loss * (1 + 1e-9)

    for conv in (w for w in weights if w.ndim == 4):
        rows = conv.reshape(conv.shape[0], -1)
        exact_rows = kmeans_1d_rows(rows, 3, "exact")
        sklearn_rows = kmeans_1d_rows(rows, 3, "sklearn")
        for row, a, b in zip(rows, exact_rows, sklearn_rows, strict=True):
            assert clustering_of_row(row, a).loss <= clustering_of_row(row, b).loss * (1 + 1e-9) + 1e-15


@pytest.mark.parametrize("kind", ["gaussian", "three_modes", "heavy_tail", "integers"])
def test_pruned_last_layer_equals_the_full_dp(kind, monkeypatch):
    rng = np.random.default_rng(5)
    values = {
        "gaussian": rng.standard_normal(9000),
        "three_modes": np.concatenate([rng.standard_normal(3000) + shift for shift in (-6, 0, 5)]),
        "heavy_tail": rng.standard_t(1.5, 9000),
        "integers": rng.integers(0, 40, 9000).astype(np.float64),
    }[kind]
    for k in (3, 4):
        pruned = kmeans_1d(values, k)
        monkeypatch.setattr(kmeans1d, "PRUNE_MIN_SIZE", 10**9)
        full = kmeans_1d(values, k)
        monkeypatch.undo()
        assert pruned.loss == pytest.approx(full.loss, rel=1e-12)


def test_rows_equal_one_at_a_time():
    rows = np.stack([heavy_tailed(200, seed) for seed in range(6)])
    together = kmeans_1d_rows(rows, 3)
    for row, centres in zip(rows, together, strict=True):
        np.testing.assert_allclose(centres, kmeans_1d(row, 3).centres, rtol=1e-12)


def test_few_distinct_values_repeat_centres():
    centres = kmeans_1d_rows(np.array([[1.0, 1.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]]), 3)
    assert set(centres[0]) == {1.0, 2.0}
    np.testing.assert_array_equal(centres[1], [3.0, 3.0, 3.0])


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown k-means method"):
        kmeans_1d(np.arange(5.0), 3, "lloyd")


@pytest.mark.real
def test_exact_is_never_worse_than_sklearn_on_minilm_weight():
    graph = onnx.load(str(minilm_path())).graph
    weight = next(numpy_helper.to_array(t) for t in graph.initializer if tuple(t.dims) == (384, 384))
    assert kmeans_1d(weight, 3, "exact").loss <= kmeans_1d(weight, 3, "sklearn").loss * (1 + 1e-9)
