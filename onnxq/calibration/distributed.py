"""Data-parallel sequential calibration on Ray (``--ray``): the same ``step``/``commit``/``close`` as
:class:`~onnxq.calibration.sequential.SequentialCalibration`, with the batches spread over Ray actors.

Rules:

- The batches are cut into shards (:mod:`onnxq.calibration.shards`); each actor
  (:class:`~onnxq.calibration.ray_worker.CalibrationWorker`) owns a contiguous run of whole shards, holds the model
  (a weight-less shell and the weight arrays, put once in the object store), keeps its own frontier activations and
  returns its per-shard sums of ``H`` (and ``C``) for each layer group.  The driver folds the shard sums in shard
  order, exactly as one process does, so the output is byte-identical to the run without ``--ray`` (same data,
  seed and ``--calib-shards``).  The group's row tasks are then solved on the same actors, idle between steps
  (:meth:`DistributedCalibration.run`, the interface of :class:`~onnxq.solve_pool.SolvePool`: each task with one
  BLAS thread, results in task order, so again the bytes of a local run); the solved weights go to every actor
  (``commit``) before the next step.
- Every ``ray.get`` has a deadline (:data:`STEP_TIMEOUT_SECONDS`).  A dead or stuck actor is one
  :class:`OnnxqError` naming the actor, its host and pid, and the layer group; the pass fails, so nothing is written.
- :meth:`DistributedCalibration.close` (also on Ctrl-C) kills the actors, and shuts Ray down when onnxq started the
  cluster (``--ray`` without an address); a cluster it joined keeps running.

``import ray`` happens here only, inside functions: Ray is an optional dependency (``onnxq[ray]``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calibration.data import CalibrationBatches, model_input_specs
from onnxq.calibration.keys import HessianKey, plan_keys
from onnxq.calibration.ray_worker import CalibrationWorker
from onnxq.calibration.sessions import ORT_THREADS
from onnxq.calibration.shards import LOCAL_CLUSTER, assign_shards, shard_ends
from onnxq.calibration.stream import CalibrationStats, finish_pass, process_cpu_seconds
from onnxq.errors import OnnxqError
from onnxq.ir.model import copy_model_without
from onnxq.ir.targets import Target
from onnxq.solve_pool import SolveTaskError
from onnxq.solvers.base import RowResult, RowTask
from onnxq.stats.hessian import HessianSum

STEP_TIMEOUT_SECONDS = 3600.0  # one layer group on one actor; past it the run fails instead of hanging
CLOSE_TIMEOUT_SECONDS = 30.0  # an actor removing its temporary files at the end of a run
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # shipped to the workers: they run the driver's onnxq


def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise OnnxqError("--ray needs Ray: pip install 'onnxq[ray]'") from None
    return ray


def connect(ray, address: str, workers: int | None) -> bool:
    """Start a local cluster (``address`` = :data:`LOCAL_CLUSTER`: ``workers`` CPUs, default all) or join ``address``
    (``auto``, ``HOST:PORT``, ``ray://…``); a process already connected keeps its connection.  True when this call
    started a cluster (the caller shuts it down).  Ray picks the node address: on Linux the machine's interface
    address, or 127.0.0.1 with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment (as the tests do)."""
    if ray.is_initialized():
        return False
    runtime_env = {"py_modules": [str(PACKAGE_DIR)]}
    if address == LOCAL_CLUSTER:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env)
        return True
    try:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise OnnxqError(f"--ray {address}: cannot join the Ray cluster ({str(exc).splitlines()[0]}); start one "
                         "with 'ray start --head' or give --ray alone for a local one") from None
    return False


class DistributedCalibration:
    """``step(i)`` → ``(H per key, stats, C per key)`` of layer group ``i`` from Ray actors; see the module rules."""

    def __init__(
        self,
        model: onnx.ModelProto,
        layer_groups: list[list[Target]],
        batches: CalibrationBatches,
        shard_ranges: list[range],
        address: str,
        workers: int | None = None,
        memory_limit: int | None = None,
        float_targets: bool = False,
        threads: int = ORT_THREADS,
        timeout: float = STEP_TIMEOUT_SECONDS,
    ) -> None:
        self.ray = import_ray()
        self.layer_groups, self.float_targets, self.timeout = layer_groups, float_targets, timeout
        self.keys = [plan_keys(group) for group in layer_groups]
        self.actors: list = []
        self.places: list[str] = []
        self.pending: dict[str, np.ndarray] = {}
        self.next_step = 0
        self.started = connect(self.ray, address, workers)
        try:
            self._start_actors(model, layer_groups, batches, shard_ranges, workers, memory_limit, threads)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, model: onnx.ModelProto, layer_groups: list[list[Target]], batches: CalibrationBatches,
                      shard_ranges: list[range], workers: int | None, memory_limit: int | None, threads: int) -> None:
        ray = self.ray
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        runs = assign_shards(shard_ranges, workers)
        feeds = list(batches)
        specs = model_input_specs(model)
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name not in specs}
        shell = copy_model_without(model, set(arrays)).SerializeToString()
        shell_ref, weights_ref = ray.put(shell), ray.put(arrays)
        del arrays
        actor_type = ray.remote(num_cpus=1, max_restarts=0)(CalibrationWorker)
        for index, run in enumerate(runs):
            first, last = run[0].start, run[-1].stop
            options = {"name": f"onnxq-calibration-{os.getpid()}-{index}", "scheduling_strategy": "SPREAD"}
            self.actors.append(actor_type.options(**options).remote(  # SPREAD: over the nodes first
                shell_ref, weights_ref, layer_groups, feeds[first:last], shard_ends(run, first), memory_limit,
                self.float_targets, threads))
            self.places.append("not started")
        self.places = self._get([actor.where.remote() for actor in self.actors], "starting")
        self.shards = [len(run) for run in runs]

    @property
    def workers(self) -> int:
        return len(self.actors)

    def commit(self, weight_name: str, values: np.ndarray) -> None:
        """Use ``values`` for ``weight_name`` from the next step on (sent to every actor with that step)."""
        self.pending[weight_name] = np.ascontiguousarray(values)

    def step(self, index: int) -> tuple[dict[HessianKey, np.ndarray], CalibrationStats, dict[HessianKey, np.ndarray]]:
        """Layer group ``index`` (steps in order, after committing the previous group's weights)."""
        if index != self.next_step:
            raise ValueError(f"sequential calibration steps must be taken in order: expected {self.next_step}")
        self.next_step += 1
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        refs = []
        if self.pending:
            weights_ref = self.ray.put(self.pending)
            refs += [actor.commit.remote(weights_ref) for actor in self.actors]
            self.pending = {}
        what = f"layer group {index + 1} of {len(self.layer_groups)}"
        self._get(refs, what)
        sums = {key: HessianSum(unit, self.float_targets) for key, unit in self.keys[index].items()}
        replies = []
        deadline = time.monotonic() + self.timeout
        for ref in [actor.step.remote(index) for actor in self.actors]:  # actors in order: the shard order
            reply = self._get([ref], what, deadline, first=len(replies))[0]
            for key, shards in reply.pop("shards").items():  # folded as they come: one actor's sums held at once
                for shard in shards:
                    sums[key].fold(shard)
            replies.append(reply)
        samples = sum(reply["samples"] for reply in replies)
        count = sum(reply["batches"] for reply in replies)
        peak = max(reply["peak"] for reply in replies)
        hessians, stats = finish_pass(sums, samples, count, peak, start, cpu_start)
        stats.peak_rss_bytes = max(stats.peak_rss_bytes, *(reply["rss"] for reply in replies))
        stats.cpu_seconds += sum(reply["cpu_seconds"] for reply in replies)
        crosses = {key: sums[key].cross_result() for key in replies[0]["cross_keys"]}
        return hessians, stats, crosses

    def run(self, tasks: list[RowTask]) -> list[RowResult]:
        """Solve a layer group's row tasks on the actors (one task at a time each, the next to the first one free);
        the results in task order.  A solver's refusal is a :class:`~onnxq.solve_pool.SolveTaskError`."""
        ray = self.ray
        what = f"solving layer group {self.next_step} of {len(self.layer_groups)}"
        results: list[tuple[str, object] | None] = [None] * len(tasks)
        running: dict = {}  # ref → (task index, actor index)
        free = list(range(self.workers))
        deadline = time.monotonic() + self.timeout
        queue = iter(range(len(tasks)))
        while True:
            while free and (index := next(queue, None)) is not None:
                actor = free.pop(0)
                running[self.actors[actor].solve.remote(tasks[index])] = (index, actor)
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                _, actor = next(iter(running.values()))
                raise OnnxqError(f"Ray actor {actor + 1} of {self.workers} ({self.places[actor]}) did not answer "
                                 f"within {self.timeout:.0f} s at {what}; nothing written")
            index, actor = running.pop(done[0])
            results[index] = self._get(done, what, deadline, first=actor)[0]
            free.append(actor)
        out = []
        for index, (kind, value) in enumerate(results):
            if kind == "refused":
                raise SolveTaskError(index, str(value))
            out.append(value)
        return out

    def __enter__(self) -> DistributedCalibration:
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing: the actors live until :meth:`close`."""

    def _get(self, refs: list, what: str, deadline: float | None = None, first: int = 0) -> list:
        """The results of ``refs`` (one per actor, from actor ``first`` on) in order, by ``deadline`` (default: the
        timeout from now); a failed or late actor is one OnnxqError."""
        ray = self.ray
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        out = []
        for index, ref in enumerate(refs):
            actor = first + index
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except ray.exceptions.GetTimeoutError:
                raise OnnxqError(f"Ray actor {actor + 1} of {self.workers} ({self.places[actor]}) did not answer "
                                 f"within {self.timeout:.0f} s at {what}; nothing written") from None
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None)  # an error raised inside the actor (e.g. ORT's), as it was
                if isinstance(cause, OnnxqError):
                    raise OnnxqError(f"Ray actor {actor + 1} of {self.workers} ({self.places[actor]}) at {what}: "
                                     f"{cause}") from None
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise OnnxqError(f"Ray actor {actor + 1} of {self.workers} ({self.places[actor]}) failed at {what}: "
                                 f"{type(exc).__name__}: {reason[:300]}; nothing written") from None
        return out

    def close(self) -> None:
        """Ask each actor to remove its temporary files (waiting at most ``CLOSE_TIMEOUT_SECONDS``), kill the actors,
        and shut Ray down when this object started the cluster.  A dead or hung actor is skipped, never waited on."""
        refs = []
        for actor in self.actors:
            try:
                refs.append(actor.close.remote())
            except Exception:  # noqa: BLE001, S110 - an actor already gone has nothing left to remove
                pass
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=CLOSE_TIMEOUT_SECONDS)
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001, S110 - an actor already gone is what we want
                pass
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False
