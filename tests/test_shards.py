"""Calibration shards (onnxq.calibration.shards): the plan depends on the batch count only, and workers that each sum
whole shards (``keep_shards``) and a driver that folds their shard sums in order give the one-process bytes for any
split of the shards over workers.  This is the rule ``--ray`` relies on (tests/test_ray.py runs it on Ray)."""

from __future__ import annotations

import graphs
import numpy as np
import pytest

from onnxq.calibration.data import iter_batches
from onnxq.calibration.keys import plan_keys
from onnxq.calibration.sequential import SequentialCalibration
from onnxq.calibration.shards import assign_shards, shard_ends, shard_ranges
from onnxq.ir.targets import find_targets
from onnxq.passes.quantize import layer_groups_of
from onnxq.stats.hessian import HessianSum


def test_shard_plan():
    assert shard_ranges(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert shard_ranges(3, 8) == [range(0, 1), range(1, 2), range(2, 3)]  # never an empty shard
    assert shard_ranges(0, 8) == []
    assert shard_ends(shard_ranges(10, 4)) == {2, 5, 7, 9}
    assert shard_ends(shard_ranges(10, 4)[2:], first_batch=6) == {1, 3}
    runs = assign_shards(shard_ranges(16, 8), 3)
    assert [len(run) for run in runs] == [3, 3, 2] and [s for run in runs for s in run] == shard_ranges(16, 8)
    assert len(assign_shards(shard_ranges(16, 2), 5)) == 2  # more workers than shards: the extra ones get none
    with pytest.raises(ValueError):
        shard_ranges(4, 0)


def _steps(model, groups, feeds, **options) -> list[tuple[dict, dict, dict]]:
    """Every step's (sums or H, C) with the float weights (no commits: the frontier logic is tested elsewhere)."""
    calibration = SequentialCalibration(model, groups, feeds, float_targets=True, **options)
    try:
        return [calibration.step_sums(i) if options.get("keep_shards") else calibration.step(i)
                for i in range(len(groups))]
    finally:
        calibration.close()


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_workers_folding_shard_sums_give_the_one_process_bytes(workers):
    model = graphs.residual_model()
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((40, 24)) * rng.lognormal(0, 0.5, (40, 1))).astype(np.float32)  # wide range: rounding
    groups = layer_groups_of(find_targets(model).targets)
    feeds = list(iter_batches({"x": x}, batch_size=4, model=model))
    ranges = shard_ranges(len(feeds), 5)
    local = _steps(model, groups, feeds, shard_ends=shard_ends(ranges))
    parts = [_steps(model, groups, feeds[run[0].start:run[-1].stop], shard_ends=shard_ends(run, run[0].start),
                    keep_shards=True) for run in assign_shards(ranges, workers)]
    for index, (hessians, _, crosses) in enumerate(local):
        sums = {key: HessianSum(unit, cross=True) for key, unit in plan_keys(groups[index]).items()}
        for worker in parts:  # workers in order, each one's shards in order
            for key, worker_sum in worker[index][0].items():
                assert len(worker_sum.shards) == len(assign_shards(ranges, workers)[parts.index(worker)])
                for shard in worker_sum.shards:
                    sums[key].fold(shard)
        for key, h in hessians.items():
            assert sums[key].result().tobytes() == h.tobytes()
        for key, c in crosses.items():
            assert sums[key].cross_result().tobytes() == c.tobytes()
    # the shard plan is part of the result: one running sum over all batches rounds differently here
    single = _steps(model, groups, feeds)
    assert any(single[i][0][key].tobytes() != h.tobytes() for i, step in enumerate(local) for key, h in step[0].items())
