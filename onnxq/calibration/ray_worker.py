"""The body of one Ray calibration actor: a :class:`SequentialCalibration` over the actor's shards of the batches.

Ray imports this module in the worker process (Ray itself is imported only inside :meth:`CalibrationWorker.where`).
The actor rebuilds the model from a weight-less shell and the weights' arrays (both from the object store), keeps
its own frontier activations for its batches, returns its per-shard sums for each step and takes the solved weights
of each group through :meth:`CalibrationWorker.commit` before the next step.  Between steps the actors are idle, so
they also solve the group's row tasks (:meth:`CalibrationWorker.solve`, :func:`onnxq.solvers.base.run_task`: one BLAS
thread, so the bytes are those of a local run).
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calibration.keys import HessianKey
from onnxq.calibration.sequential import SequentialCalibration
from onnxq.calibration.sessions import Feed
from onnxq.calibration.stream import process_cpu_seconds, process_peak_rss_bytes
from onnxq.errors import OnnxqError
from onnxq.heap import reuse_freed_memory
from onnxq.ir.targets import Target
from onnxq.solvers.base import RowTask, run_task
from onnxq.stats.hessian import ShardSum


def rebuild_model(shell: bytes, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The model from a shell whose main-graph initializers named in ``weights`` are placeholders
    (:func:`onnxq.ir.model.copy_model_without`) and their arrays."""
    model = onnx.load_from_string(shell)
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in weights:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.asarray(weights[tensor.name]),
                                                                            tensor.name))
    return model


class CalibrationWorker:
    """One actor: ``step(i)`` → this actor's shard sums of layer group ``i``; ``commit`` → solved weights."""

    def __init__(
        self, shell: bytes, weights: dict[str, np.ndarray], layer_groups: list[list[Target]], batches: list[Feed],
        shard_ends: frozenset[int], memory_limit: int | None, float_targets: bool, threads: int,
    ) -> None:
        reuse_freed_memory()  # this actor's process also solves row tasks
        model = rebuild_model(shell, weights)
        self.calibration = SequentialCalibration(model, layer_groups, batches, memory_limit, threads, float_targets,
                                                 shard_ends, keep_shards=True)

    def where(self) -> str:
        """``host:pid node <id>`` of this actor's process (named in errors and in the run's notes)."""
        import ray  # only ever called inside a Ray actor

        return f"{socket.gethostname()}:{os.getpid()} node {ray.get_runtime_context().get_node_id()[:8]}"

    def pid(self) -> int:
        return os.getpid()

    def step(self, index: int) -> dict[str, object]:
        """Layer group ``index``: the shard sums per key (in shard order), the keys with a ``C``, samples, batches,
        peak bytes of one batch's layer inputs, this process's peak RSS, wall and CPU seconds."""
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        sums, samples, count, peak, cross_keys = self.calibration.step_sums(index)
        shards: dict[HessianKey, list[ShardSum]] = {key: s.shards for key, s in sums.items()}
        return {"shards": shards, "cross_keys": cross_keys, "samples": samples, "batches": count, "peak": peak,
                "rss": process_peak_rss_bytes(), "seconds": time.perf_counter() - start,
                "cpu_seconds": process_cpu_seconds() - cpu_start}

    def commit(self, weights: dict[str, np.ndarray]) -> None:
        """The solved (dequantized) weights of the last group, in their initializers' layout."""
        for name, values in weights.items():
            self.calibration.commit(name, values)

    def solve(self, task: RowTask) -> tuple[str, object]:
        """One row task: ``("ok", RowResult)``, or ``("refused", message)`` when its solver refuses the input."""
        try:
            return "ok", run_task(task)
        except OnnxqError as exc:
            return "refused", str(exc)

    def close(self) -> None:
        self.calibration.close()
