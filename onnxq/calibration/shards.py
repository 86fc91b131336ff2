"""Calibration shards: the batches cut into contiguous runs whose Hessian sums are added in a fixed order.

Rules: ``n`` batches make ``min(shards, n)`` shards of ``⌈n/s⌉`` or ``⌊n/s⌋`` batches (the longer ones first), in
batch order.  Each shard's ``H`` (and ``C``) is summed from zero, then the shard sums are added in shard order
(:class:`onnxq.stats.hessian.HessianSum`).  The plan depends on the number of batches and ``--calib-shards`` only,
never on how many processes compute it, so a data-parallel run (``--ray``) whose workers own whole shards gives the
same bytes as one process; ``--calib-shards 1`` is the plain running sum over all batches.
"""

from __future__ import annotations

DEFAULT_SHARDS = 8
LOCAL_CLUSTER = "local"  # --ray alone: start a Ray cluster on this machine


def shard_ranges(batches: int, shards: int) -> list[range]:
    """The batch indices of each shard, in order (no empty shard; none at all for no batch)."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    count = min(shards, batches)
    if count == 0:
        return []
    size, longer = divmod(batches, count)
    out, start = [], 0
    for index in range(count):
        stop = start + size + (1 if index < longer else 0)
        out.append(range(start, stop))
        start = stop
    return out


def shard_ends(ranges: list[range], first_batch: int = 0) -> frozenset[int]:
    """Positions (counted from ``first_batch``) of the last batch of each shard: where a shard's sums close."""
    return frozenset(r[-1] - first_batch for r in ranges)


def assign_shards(ranges: list[range], workers: int) -> list[list[range]]:
    """Contiguous runs of whole shards for ``min(workers, shards)`` workers, as even as shard counts allow; worker
    ``i``'s shards all come before worker ``i + 1``'s, so the driver folds the workers' shard sums in worker order."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return [ranges[r.start:r.stop] for r in shard_ranges(len(ranges), workers)]
