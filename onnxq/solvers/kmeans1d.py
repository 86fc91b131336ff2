"""1-D k-means: an exact solver (sort + dynamic programming) and scikit-learn's KMeans as the reference.

On sorted values ``x₁ ≤ … ≤ xₙ`` an optimal k-means partition is made of contiguous runs, so with
``cost(i, j) = Σ_{i<t≤j} (x_t − mean)² = (P₂[j] − P₂[i]) − (P₁[j] − P₁[i])²/(j − i)`` (prefix sums)
the optimum is the dynamic programme

    D₁[j] = cost(0, j),    D_m[j] = min_{i<j} D_{m−1}[i] + cost(i, j),    loss = D_k[n].

The best split point ``opt_m(j)`` is non-decreasing in ``j`` (the cost is a Monge array), so each
layer is solved by divide and conquer in ``O(n log n)``, vectorised over every row of a matrix at once.
Clusters are then described by their sorted centres and the midpoints between them; a value ``v``
belongs to cluster ``#{boundaries < v}`` (so ``v ≤ t₁`` is cluster 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SKLEARN_N_INIT = 4
SKLEARN_THREADED_SIZE = 50_000  # below this, sklearn runs on one thread


@dataclass(frozen=True)
class Clustering1D:
    """Sorted ``centres [k]``, ``boundaries [k−1]`` (midpoints of the centres) and the partition's loss."""

    centres: np.ndarray
    boundaries: np.ndarray
    loss: float  # Σ (v − mean of its cluster)² over the partition the boundaries induce

    def labels(self, values: np.ndarray) -> np.ndarray:
        """Cluster index of each value: ``#{boundaries < v}``."""
        return assign(values, self.boundaries)


def assign(values: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Cluster index ``#{boundaries < v}`` of each value (``v ≤ t₁`` → 0, …)."""
    return np.searchsorted(
        np.asarray(boundaries, dtype=np.float64), np.asarray(values, dtype=np.float64), side="left"
    ).astype(np.int8)


def partition_loss(values: np.ndarray, labels: np.ndarray, k: int) -> float:
    """``Σ_c Σ_{v ∈ c} (v − mean_c)²`` in float64."""
    values = np.asarray(values, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    counts = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=values, minlength=k)
    means = np.divide(sums, counts, out=np.zeros(k), where=counts > 0)
    return float(np.sum((values - means[labels]) ** 2))


def kmeans_1d(values: np.ndarray, k: int = 3, method: str = "exact", seed: int = 0) -> Clustering1D:
    """Cluster all ``values`` (any shape) into ``k`` groups; ``method`` is ``"exact"`` or ``"sklearn"``."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if method == "exact":
        centres = kmeans_1d_rows(flat[None, :], k)[0]
    elif method == "sklearn":
        centres = _sklearn_centres(flat, k, seed)
    else:
        raise ValueError(f"unknown k-means method {method!r}; use 'exact' or 'sklearn'")
    return _clustering(flat, centres, k)


def kmeans_1d_rows(rows: np.ndarray, k: int = 3, method: str = "exact", seed: int = 0) -> np.ndarray:
    """Sorted centres ``[R, k]`` of an independent k-means per row of ``rows [R, n]``.

    A row with fewer than ``k`` distinct values repeats centres (some clusters are then empty).
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"rows must be a non-empty [R, n] matrix, got shape {rows.shape}")
    if method == "sklearn":
        return np.stack([_sklearn_centres(row, k, seed) for row in rows])
    if method != "exact":
        raise ValueError(f"unknown k-means method {method!r}; use 'exact' or 'sklearn'")
    return _exact_centres(np.sort(rows, axis=1), k)


def clustering_of_row(row: np.ndarray, centres: np.ndarray) -> Clustering1D:
    """The :class:`Clustering1D` of one row given its sorted centres."""
    row = np.asarray(row, dtype=np.float64).ravel()
    return _clustering(row, centres, len(centres))


def _clustering(flat: np.ndarray, centres: np.ndarray, k: int) -> Clustering1D:
    centres = np.sort(np.asarray(centres, dtype=np.float64))
    boundaries = (centres[:-1] + centres[1:]) / 2
    return Clustering1D(centres, boundaries, partition_loss(flat, assign(flat, boundaries), k))


# ----------------------------------------------------------------------------- exact dynamic programme


def _exact_centres(sorted_rows: np.ndarray, k: int) -> np.ndarray:
    """Optimal centres ``[R, k]`` of sorted rows, by the layered DP with divide and conquer."""
    r, n = sorted_rows.shape
    if n < k:
        pad = np.repeat(sorted_rows[:, -1:], k - n, axis=1)
        return np.concatenate([sorted_rows, pad], axis=1)
    centred = sorted_rows - sorted_rows.mean(axis=1, keepdims=True)  # smaller prefix sums, less cancellation
    p1 = np.zeros((r, n + 1))
    p2 = np.zeros((r, n + 1))
    np.cumsum(centred, axis=1, out=p1[:, 1:])
    np.cumsum(centred * centred, axis=1, out=p2[:, 1:])
    p1, p2 = p1.ravel(), p2.ravel()
    base = np.arange(r, dtype=np.int64) * (n + 1)

    def cost(flat_i: np.ndarray, flat_j: np.ndarray) -> np.ndarray:
        """Cost of the run ``(i, j]``, ``i < j``, given flat indices into the prefix arrays (same row)."""
        s1 = p1[flat_j] - p1[flat_i]
        return (p2[flat_j] - p2[flat_i]) - s1 * s1 / (flat_j - flat_i)

    columns = np.arange(1, n + 1, dtype=np.float64)
    previous = np.full((r, n + 1), np.inf)  # D₁[j] = cost(0, j); D₁[0] is not a valid state
    previous[:, 1:] = p2.reshape(r, n + 1)[:, 1:] - p1.reshape(r, n + 1)[:, 1:] ** 2 / columns
    choices: list[np.ndarray] = []  # opt_m[r, j] for m = 2 … k−1
    for m in range(2, k):
        previous, opt = _dp_layer(previous, p1, p2, base, m, n)
        choices.append(opt)

    # last layer: only j = n is needed
    starts = np.arange(k - 1, n, dtype=np.int64)
    flat_i = (base[:, None] + starts).ravel()
    flat_n = np.repeat(base + n, len(starts))
    total = previous[:, k - 1 : n] + cost(flat_i, flat_n).reshape(r, -1)
    cut = np.argmin(total, axis=1) + k - 1

    cuts = [np.full(r, n, dtype=np.int64), cut]
    for opt in reversed(choices):
        cut = opt[np.arange(r), cut]
        cuts.append(cut)
    cuts.append(np.zeros(r, dtype=np.int64))
    cuts = cuts[::-1]  # 0 = c₀ < c₁ < … < c_k = n
    raw_p1 = np.zeros((r, n + 1))
    np.cumsum(sorted_rows, axis=1, out=raw_p1[:, 1:])
    rows_index = np.arange(r)
    centres = np.empty((r, k))
    for m in range(k):
        lo, hi = cuts[m], cuts[m + 1]
        centres[:, m] = (raw_p1[rows_index, hi] - raw_p1[rows_index, lo]) / (hi - lo)
    return np.sort(centres, axis=1)


def _dp_layer(
    previous: np.ndarray, p1: np.ndarray, p2: np.ndarray, base: np.ndarray, m: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``D_m[j] = min_{m−1 ≤ i < j} D_{m−1}[i] + cost(i, j)`` for ``m ≤ j ≤ n``, all rows at once.

    Divide and conquer on ``j``: the argmin at the middle ``j`` bounds the argmin range of both
    halves (monotone split points), so each of the ``log n`` levels costs ``O(n)`` per row.
    Segments stay ordered by (row, j), so the gathers below read memory almost sequentially.
    """
    r = previous.shape[0]
    current = np.full((r, n + 1), np.inf)
    opt = np.zeros((r, n + 1), dtype=np.int64)
    # D_{m−1}[i] + cost(i, j) = (D_{m−1}[i] − P₂[i]) + P₂[j] − (P₁[j] − P₁[i])²/(j − i)
    shifted = previous.ravel() - p2
    row_base = base.copy()
    j_lo = np.full(r, m, dtype=np.int64)
    j_hi = np.full(r, n, dtype=np.int64)
    i_lo = np.full(r, m - 1, dtype=np.int64)
    i_hi = np.full(r, n - 1, dtype=np.int64)
    while row_base.size:
        mid = (j_lo + j_hi) // 2
        lengths = np.minimum(i_hi, mid - 1) - i_lo + 1
        starts = np.cumsum(lengths) - lengths
        flat_j = row_base + mid
        seg = np.zeros(int(lengths.sum()), dtype=np.int64)  # segment of each candidate
        seg[starts[1:]] = 1
        np.cumsum(seg, out=seg)
        flat_i = np.arange(seg.size, dtype=np.int64) + (row_base + i_lo - starts)[seg]
        diff = p1[flat_j][seg] - p1[flat_i]
        values = shifted[flat_i] - diff * diff / (flat_j[seg] - flat_i)
        best = np.minimum.reduceat(values, starts)
        hits = np.flatnonzero(values == best[seg])
        arg = flat_i[hits[np.searchsorted(hits, starts)]] - row_base  # leftmost argmin per segment
        current.ravel()[flat_j] = best + p2[flat_j]
        opt.ravel()[flat_j] = arg
        # children, interleaved (left, right) per parent so the order by (row, j) is kept
        child_lo = np.stack([j_lo, mid + 1], axis=1).ravel()
        child_hi = np.stack([mid - 1, j_hi], axis=1).ravel()
        keep = child_lo <= child_hi
        row_base = np.repeat(row_base, 2)[keep]
        i_lo = np.stack([i_lo, arg], axis=1).ravel()[keep]
        i_hi = np.stack([arg, i_hi], axis=1).ravel()[keep]
        j_lo, j_hi = child_lo[keep], child_hi[keep]
    return current, opt


# ----------------------------------------------------------------------------- scikit-learn reference


def _sklearn_centres(flat: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Centres from ``sklearn.cluster.KMeans(k, n_init=4, random_state=seed)`` (sorted)."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    distinct = np.unique(flat)
    if len(distinct) < k:
        return np.concatenate([distinct, np.repeat(distinct[-1:], k - len(distinct))])
    # OpenMP threads spin-wait for ~1 s per fit on a busy machine; small inputs run faster on one thread
    threads = None if flat.size >= SKLEARN_THREADED_SIZE else 1
    with warnings.catch_warnings(), threadpool_limits(limits=threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = KMeans(n_clusters=k, n_init=SKLEARN_N_INIT, random_state=seed).fit(flat.reshape(-1, 1))
    return np.sort(fit.cluster_centers_.ravel())
