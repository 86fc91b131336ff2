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
PRUNE_MIN_SIZE = 4096  # rows at least this long prune the last DP layer with block bounds
PRUNE_BLOCK = 256  # grid stride of that pruning
PRUNE_SLACK = 1e-9  # relative slack on the bound (prefix-sum rounding)


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
    prefix = _Prefix(p1.ravel(), p2.ravel(), np.arange(r, dtype=np.int64) * (n + 1), n)

    columns = np.arange(1, n + 1, dtype=np.float64)
    previous = np.full((r, n + 1), np.inf)  # D₁[j] = cost(0, j); D₁[0] is not a valid state
    previous[:, 1:] = p2[:, 1:] - p1[:, 1:] ** 2 / columns
    choices: list[np.ndarray] = []  # opt_m[r, j] for m = 2 … k−1
    for m in range(2, k):
        if m == k - 1 and n >= PRUNE_MIN_SIZE:
            previous, opt = _last_layer_pruned(previous, prefix, m)
        else:
            previous, opt = _dp_layer(previous, prefix, m)
        choices.append(opt)

    cut = np.argmin(_final_objective(previous, prefix, k - 1), axis=1) + k - 1  # start of the last cluster
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


@dataclass(frozen=True)
class _Prefix:
    """Flat prefix sums ``P₁``, ``P₂`` of R rows (row ``r`` starts at ``base[r]``, ``n + 1`` entries each)."""

    p1: np.ndarray
    p2: np.ndarray
    base: np.ndarray
    n: int

    def cost(self, flat_i: np.ndarray, flat_j: np.ndarray) -> np.ndarray:
        """Cost of the run ``(i, j]``, ``i < j``, from flat indices (same row)."""
        s1 = self.p1[flat_j] - self.p1[flat_i]
        return (self.p2[flat_j] - self.p2[flat_i]) - s1 * s1 / (flat_j - flat_i)


def _final_objective(previous: np.ndarray, prefix: _Prefix, first: int) -> np.ndarray:
    """``F[r, j] = D_{k−1}[j] + cost(j, n)`` for ``first ≤ j < n`` (``[R, n − first]``)."""
    r, n = previous.shape[0], prefix.n
    starts = np.arange(first, n, dtype=np.int64)
    flat_i = (prefix.base[:, None] + starts).ravel()
    flat_n = np.repeat(prefix.base + n, len(starts))
    return previous[:, first:n] + prefix.cost(flat_i, flat_n).reshape(r, -1)


def _dp_layer(previous: np.ndarray, prefix: _Prefix, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``D_m[j] = min_{m−1 ≤ i < j} D_{m−1}[i] + cost(i, j)`` for every ``m ≤ j ≤ n``, all rows at once."""
    r, n = previous.shape[0], prefix.n
    current = np.full((r, n + 1), np.inf)
    opt = np.zeros((r, n + 1), dtype=np.int64)
    full = np.ones(r, dtype=np.int64)
    _divide_and_conquer(previous, prefix, current, opt, np.arange(n + 1, dtype=np.int64), prefix.base,
                        full * m, full * n, full * (m - 1), full * (n - 1))
    return current, opt


def _last_layer_pruned(previous: np.ndarray, prefix: _Prefix, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``D_m[j]`` only where the final optimum can be (``inf`` elsewhere); same result as :func:`_dp_layer`.

    ``D_m`` is non-decreasing in ``j`` and ``cost(j, n)`` non-increasing, so on a block ``g_t < j < g_{t+1}``
    of a coarse grid ``F(j) = D_m[j] + cost(j, n) ≥ D_m[g_t] + cost(g_{t+1}, n)``; blocks whose bound exceeds
    the best grid value cannot hold the optimum and are skipped.
    """
    r, n = previous.shape[0], prefix.n
    current = np.full((r, n + 1), np.inf)
    opt = np.zeros((r, n + 1), dtype=np.int64)
    grid = np.unique(np.concatenate([np.arange(m, n, PRUNE_BLOCK, dtype=np.int64), [n - 1]]))
    ones = np.ones(r, dtype=np.int64)
    _divide_and_conquer(previous, prefix, current, opt, grid, prefix.base,
                        ones * 0, ones * (len(grid) - 1), ones * (m - 1), ones * (n - 1))
    flat_g = prefix.base[:, None] + grid
    flat_n = (prefix.base + n)[:, None] + np.zeros_like(grid)
    at_grid = current[:, grid] + prefix.cost(flat_g.ravel(), flat_n.ravel()).reshape(r, -1)
    best = at_grid.min(axis=1, keepdims=True)
    bound = current[:, grid[:-1]] + prefix.cost(flat_g[:, 1:].ravel(), flat_n[:, 1:].ravel()).reshape(r, -1)
    rows, blocks = np.nonzero(bound <= best + PRUNE_SLACK * np.abs(best) + 1e-300)
    lo, hi = grid[blocks] + 1, grid[blocks + 1] - 1
    inner = lo <= hi
    rows, blocks, lo, hi = rows[inner], blocks[inner], lo[inner], hi[inner]
    _divide_and_conquer(previous, prefix, current, opt, np.arange(n + 1, dtype=np.int64), prefix.base[rows],
                        lo, hi, opt[rows, grid[blocks]], opt[rows, grid[blocks + 1]])
    return current, opt


def _divide_and_conquer(
    previous: np.ndarray,
    prefix: _Prefix,
    current: np.ndarray,
    opt: np.ndarray,
    js: np.ndarray,
    row_base: np.ndarray,
    p_lo: np.ndarray,
    p_hi: np.ndarray,
    i_lo: np.ndarray,
    i_hi: np.ndarray,
) -> None:
    """Fill ``current``/``opt`` at ``j = js[p]`` for ``p_lo ≤ p ≤ p_hi`` per segment, argmin searched in
    ``[i_lo, min(i_hi, j − 1)]``.

    The argmin at the middle ``j`` bounds the argmin range of both halves (monotone split points), so each
    of the ``log n`` levels costs ``O(n)`` per row.  Segments stay ordered by (row, j), so the gathers read
    memory almost sequentially.
    """
    # D_{m−1}[i] + cost(i, j) = (D_{m−1}[i] − P₂[i]) + P₂[j] − (P₁[j] − P₁[i])²/(j − i)
    shifted = previous.ravel() - prefix.p2
    p1, p2 = prefix.p1, prefix.p2
    current_flat, opt_flat = current.ravel(), opt.ravel()
    while row_base.size:
        mid = (p_lo + p_hi) // 2
        j = js[mid]
        lengths = np.minimum(i_hi, j - 1) - i_lo + 1
        starts = np.cumsum(lengths) - lengths
        flat_j = row_base + j
        seg = np.zeros(int(lengths.sum()), dtype=np.int64)  # segment of each candidate
        seg[starts[1:]] = 1
        np.cumsum(seg, out=seg)
        flat_i = np.arange(seg.size, dtype=np.int64) + (row_base + i_lo - starts)[seg]
        diff = p1[flat_j][seg] - p1[flat_i]
        values = shifted[flat_i] - diff * diff / (flat_j[seg] - flat_i)
        best = np.minimum.reduceat(values, starts)
        hits = np.flatnonzero(values == best[seg])
        arg = flat_i[hits[np.searchsorted(hits, starts)]] - row_base  # leftmost argmin per segment
        current_flat[flat_j] = best + p2[flat_j]
        opt_flat[flat_j] = arg
        # children, interleaved (left, right) per parent so the order by (row, j) is kept
        child_lo = np.stack([p_lo, mid + 1], axis=1).ravel()
        child_hi = np.stack([mid - 1, p_hi], axis=1).ravel()
        keep = child_lo <= child_hi
        row_base = np.repeat(row_base, 2)[keep]
        i_lo = np.stack([i_lo, arg], axis=1).ravel()[keep]
        i_hi = np.stack([arg, i_hi], axis=1).ravel()[keep]
        p_lo, p_hi = child_lo[keep], child_hi[keep]


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
