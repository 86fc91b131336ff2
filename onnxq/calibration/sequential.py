"""Sequential calibration: each layer group's ``H`` from the activations of the already-quantized earlier groups.

Layer groups are solved in graph order; before group ``i`` is calibrated, the weights of groups ``< i`` hold their
dequantized values: the caller hands each solved weight back with :meth:`SequentialCalibration.commit`, which
replaces it in this object's own table of weights (the model itself is never changed).  A tensor is *stale* while it
depends on a weight that is still to be solved (groups ``≥ i``) and is committed before the last step that reads the
tensor, *settled* otherwise.  The *frontier* ``F_i`` is the set of settled, computed tensors that stale nodes still
need (on the way to a later group's input).  Its values are kept for every calibration batch, so step ``i`` runs only
the nodes whose outputs settled since step ``i − 1``, fed by ``F_{i−1}`` and the graph inputs: over all steps every
node runs once, i.e. sequential calibration costs one forward pass over the calibration data, the same as
calibrating every layer on float inputs.  :mod:`onnxq.calibration.steps` plans every step from the graph.

For a transformer the frontier is the residual stream plus whatever a block's partial results the next group needs
(attention output before ``o_proj``, the MLP product before ``down_proj``) and shared tensors such as masks: a few
activations of the hidden size per token.  It is held in memory up to ``memory_limit`` bytes, beyond that in
memory-mapped temp files.  A committed (solved, dequantized) weight goes to a file in this object's temp folder and
is read back only for the step whose nodes read it, so the solved weights cost no memory between steps (a
1.1 B-parameter model would otherwise hold a second copy of its weights by the last step).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from onnxq.calibration.data import CalibrationBatches, check_feed, model_input_specs
from onnxq.calibration.keys import HessianKey, plan_keys
from onnxq.calibration.sessions import INLINE_TENSOR_BYTES, ORT_THREADS, Feed, model_shell, open_session, run_session
from onnxq.calibration.steps import StepPlan, plan_steps
from onnxq.calibration.stream import CalibrationStats, accumulate_pass, finish_pass, origins, process_cpu_seconds
from onnxq.errors import OnnxqError
from onnxq.heap import release_free_memory
from onnxq.ir.index import reads
from onnxq.ir.targets import Target
from onnxq.spill import SpillFolder
from onnxq.stats.hessian import HessianSum

DEFAULT_MEMORY_LIMIT = 4 << 30  # frontier bytes kept in RAM before spilling to temp files


class FrontierStore:
    """Activations per calibration batch and name (a step's frontier, or the float model's layer inputs computed
    ahead); arrays past ``memory_limit`` bytes go to memory-mapped files."""

    def __init__(self, memory_limit: int) -> None:
        self.memory_limit = memory_limit
        self.values: dict[tuple[int, str], np.ndarray] = {}
        self.memory_bytes = 0  # bytes held in RAM
        self.total_bytes = 0  # RAM plus spilled
        self.peak_bytes = 0
        self._spilled = SpillFolder("onnxq-frontier-")

    def put(self, batch: int, name: str, value: np.ndarray) -> None:
        if self.memory_bytes + value.nbytes > self.memory_limit:
            value = self._spilled.put(value)
        else:
            self.memory_bytes += value.nbytes
        self.values[(batch, name)] = value
        self.total_bytes += value.nbytes
        self.peak_bytes = max(self.peak_bytes, self.total_bytes)

    def get(self, batch: int, name: str) -> np.ndarray:
        return np.asarray(self.values[(batch, name)])

    def pop(self, batch: int, name: str) -> np.ndarray:
        value = self.values.pop((batch, name))
        self.total_bytes -= value.nbytes
        if not isinstance(value, np.memmap):
            self.memory_bytes -= value.nbytes
        return np.asarray(value)

    def keep(self, names: set[str]) -> None:
        """Drop every tensor not in ``names``."""
        for batch, name in [k for k in self.values if k[1] not in names]:
            self.pop(batch, name)

    def close(self) -> None:
        self.values.clear()
        self._spilled.close()


class FloatStepValues:
    """The float model's layer inputs of one step, batch by batch as its thread computes them (a
    :class:`FrontierStore` of ``limit`` bytes); :meth:`take` waits for one batch's values and hands them over."""

    def __init__(self, limit: int) -> None:
        self.store = FrontierStore(limit)
        self.ready = 0  # batches computed so far
        self.done = False  # every batch is computed
        self.error: BaseException | None = None
        self._changed = threading.Condition()

    def put(self, batch: int, values: Mapping[str, np.ndarray]) -> None:
        with self._changed:
            for name, value in values.items():
                self.store.put(batch, name, value)
            self.ready = batch + 1
            self._changed.notify_all()

    def end(self, error: BaseException | None = None) -> None:
        """Every batch is computed, or the float step failed with ``error``."""
        with self._changed:
            self.done, self.error = error is None, error
            self._changed.notify_all()

    def take(self, batch: int, names: list[str]) -> dict[str, np.ndarray]:
        """Batch ``batch``'s values of ``names``, removed from the store (waits until they are computed; raises the
        float step's error if it failed)."""
        with self._changed:
            while self.ready <= batch and not self.done and self.error is None:
                self._changed.wait(timeout=1.0)
            if self.error is not None:
                raise self.error
            return {name: self.store.pop(batch, name) for name in names}

    def close(self) -> None:
        self.store.close()


class CommittedWeights(Mapping[str, onnx.TensorProto]):
    """The model's initializers by name, with the committed ones replaced by their solved values.

    A committed array is written to ``folder`` at once and read back (as a new ``TensorProto``) each time it is
    looked up, so the process holds only the float model and the weights of the step being run."""

    def __init__(self, float_weights: Mapping[str, onnx.TensorProto], folder: Path) -> None:
        self.float_weights, self.folder = float_weights, folder
        self.committed: dict[str, tuple[Path, np.dtype, tuple[int, ...]]] = {}
        self._files = 0

    def commit(self, name: str, values: np.ndarray) -> None:
        self.folder.mkdir(exist_ok=True)
        self._files += 1
        path = self.folder / f"{self._files}.bin"
        values = np.ascontiguousarray(values)
        values.tofile(path)
        self.committed[name] = (path, values.dtype, values.shape)

    def __getitem__(self, name: str) -> onnx.TensorProto:
        if name in self.committed:
            path, dtype, shape = self.committed[name]
            return onnx.numpy_helper.from_array(np.fromfile(path, dtype=dtype).reshape(shape), name)
        return self.float_weights[name]

    def __contains__(self, name: object) -> bool:
        return name in self.float_weights

    def __iter__(self) -> Iterator[str]:
        return iter(self.float_weights)

    def __len__(self) -> int:
        return len(self.float_weights)


class SequentialCalibration:
    """``step(i)`` returns the Hessians of layer group ``i``, computed with the weights committed so far.

    ``model`` is only read.  After solving group ``i``, the caller passes each solved weight to :meth:`commit`
    before ``step(i + 1)``.  Steps must be taken in order ``0, 1, 2, …``.  With ``float_targets`` each step also
    needs the float model (the original weights) and returns ``C = Σ xᵀx_float`` per key.

    The float model's values do not depend on any solve, so its steps run ahead in a thread of their own: when
    step ``i`` starts, the float step ``i + 1`` is queued behind the float step ``i``, and it runs while the
    quantized step ``i`` and then group ``i``'s solve go on.  Its layer inputs wait in a store of their own
    (spilled past their share of ``memory_limit``) and are handed over batch by batch.  Each session runs the same
    nodes on the same values as when both ran batch by batch, so ``H`` and ``C`` keep their bytes.  The float
    thread reads the batches itself: a folder of .npz files is read twice per step, and two of its files can be in
    memory at once.

    ``shard_ends``: the batch positions that close a shard (:mod:`onnxq.calibration.shards`).  A data-parallel
    worker holds a slice of the batches, passes ``keep_shards`` and calls :meth:`step_sums` for its shard sums.
    ``threads``: ORT intra-op threads; with float targets the two sessions run at once and get half each (their
    outputs do not depend on it).  ``memory_limit`` (bytes of kept activations): the quantized frontier gets half,
    and with float targets the float frontier a quarter and the float layer inputs of the two steps in flight an
    eighth each.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        layer_groups: list[list[Target]],
        batches: CalibrationBatches,
        memory_limit: int | None = None,
        threads: int = ORT_THREADS,
        float_targets: bool = False,
        shard_ends: Collection[int] = (),
        keep_shards: bool = False,
    ) -> None:
        self.model, self.layer_groups, self.batches = model, layer_groups, batches
        # with float targets the quantized and the float session run side by side: they share the threads
        self.threads = max(1, threads // 2) if float_targets else threads
        self.float_targets = float_targets
        self.shard_ends, self.keep_shards = shard_ends, keep_shards
        limit = DEFAULT_MEMORY_LIMIT if memory_limit is None else memory_limit
        self.store = FrontierStore(limit // 2 if float_targets else limit)
        self.float_store = FrontierStore(limit // 4) if float_targets else None
        self.float_values_limit = limit // 8  # per float step in flight (the one being read, the one ahead)
        self.specs = model_input_specs(model)
        self.float_weights = {t.name: t for t in model.graph.initializer}
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxq-sequential-")
        self.weights = CommittedWeights(self.float_weights, Path(self._tmp.name) / "solved")
        self.node_reads = [reads(node) for node in model.graph.node]  # once: planning and sessions read them
        self.keys = [plan_keys(group) for group in layer_groups]
        self.plans = plan_steps(model.graph, layer_groups, self.keys, self.node_reads)
        self.next_step = 0
        self.node_runs = 0  # nodes run over all steps (each node once when the frontier works as intended)
        self.dtypes: dict[str, int] = {}
        self._float_pool = ThreadPoolExecutor(1, "onnxq-float") if float_targets else None
        self._float_steps: dict[int, tuple[Future[None], FloatStepValues]] = {}
        self._closing = threading.Event()

    def commit(self, weight_name: str, values: np.ndarray) -> None:
        """Use ``values`` (the solved weight, dequantized, in the initializer's layout) for ``weight_name`` in the
        steps that follow."""
        self.weights.commit(weight_name, values)

    def step(
        self, index: int
    ) -> tuple[dict[HessianKey, np.ndarray], CalibrationStats, dict[HessianKey, np.ndarray]]:
        """``(H per key, stats, C per key)``: ``H = Σ xᵀx`` with the committed weights; with ``float_targets``,
        ``C = Σ xᵀx_float`` with ``x_float`` the float model's value of the same layer input (else ``{}``)."""
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        sums, samples, count, peak, cross_keys = self.step_sums(index)
        hessians, stats = finish_pass(sums, samples, count, peak, start, cpu_start)
        crosses = {key: sums[key].cross_result() for key in cross_keys}
        return hessians, stats, crosses

    def step_sums(self, index: int) -> tuple[dict[HessianKey, HessianSum], int, int, int, list[HessianKey]]:
        """Step ``index``'s running sums (whole, or per shard with ``keep_shards``), samples, batches, peak bytes of
        one batch's layer inputs, and the keys that get a ``C`` (float targets: inputs that differ from the float
        model's)."""
        if index != self.next_step:
            raise ValueError(f"sequential calibration steps must be taken in order: expected {self.next_step}")
        self.next_step += 1
        plan = self.plans[index]
        self.node_runs += len(plan.nodes)
        floating = None
        if self.float_targets:
            for ahead in (index, index + 1)[: len(self.plans) - index]:
                self._queue_float_step(ahead)
            floating = self._float_steps[index][1]
        quantized = self._runner(self.weights, self.store, plan, plan.layer_inputs, "")

        def take_float(batch: int) -> dict[str, np.ndarray]:
            return floating.take(batch, plan.changed)

        sums, samples, count, peak = accumulate_pass(
            quantized, self.batches, self.specs, self.weights, plan.units, self.shard_ends, self.keep_shards,
            None if floating is None else take_float
        )
        quantized = None
        self._remove_session_files(index, "")
        if floating is not None:
            self._float_steps.pop(index)[1].close()
        release_free_memory()  # the step's sessions and activations are gone
        self.store.keep(plan.kept)
        changed = set(plan.changed) if self.float_targets else set()
        cross_keys = [key for key in sums if plan.units[key].tensor in changed]
        return sums, samples, count, peak, cross_keys

    def _queue_float_step(self, index: int) -> None:
        if index not in self._float_steps:  # queued in step order: each float step reads the one before's frontier
            values = FloatStepValues(self.float_values_limit)
            self._float_steps[index] = (self._float_pool.submit(self._float_step, self.plans[index], values), values)

    def _float_step(self, plan: StepPlan, values: FloatStepValues) -> None:
        """The float model's step ``plan.index`` over every batch: its frontier into ``float_store``, its changed
        layer inputs into ``values`` batch by batch.  Stops after the current batch once :meth:`close` is called."""
        try:
            if plan.nodes or plan.changed:
                run = self._runner(self.float_weights, self.float_store, plan, plan.changed, "f")
                for batch, (origin, feed) in enumerate(origins(self.batches)):
                    if self._closing.is_set():
                        raise OnnxqError("sequential calibration was closed")
                    values.put(batch, run(batch, origin, check_feed(self.specs, feed, origin)))
                run = None
            self.float_store.keep(plan.kept)
            values.end()
        except BaseException as error:
            values.end(error)
            raise
        finally:
            self._remove_session_files(plan.index, "f")

    def _runner(self, weights: Mapping[str, onnx.TensorProto], store: FrontierStore, plan: StepPlan,
                layer_inputs: list[str], tag: str):
        """``run(batch, origin, feed) -> layer inputs`` of step ``plan`` for one set of weights and its frontier
        store."""
        session, feeds = self._session(weights, store, plan, tag) if plan.nodes else (None, [])

        def run(batch: int, origin: str, feed: Feed) -> dict[str, np.ndarray]:
            inputs = {name: feed[name] if name in self.specs else store.get(batch, name) for name in feeds}
            values = run_session(session, plan.outputs, inputs, origin)
            for name in plan.new_frontier:
                self.dtypes.setdefault(name, onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype))
                store.put(batch, name, values[name])
            return {t: values[t] if t in values else store.get(batch, t) for t in layer_inputs}

        return run

    def close(self) -> None:
        """Stop the float steps running ahead (after their current batch) and remove every temp file."""
        self._closing.set()
        if self._float_pool is not None:
            self._float_pool.shutdown(wait=True, cancel_futures=True)
            for _, values in self._float_steps.values():
                values.close()
            self._float_steps.clear()
        for store in filter(None, (self.store, self.float_store)):
            store.close()
        self._tmp.cleanup()

    def _remove_session_files(self, index: int, tag: str) -> None:
        for path in Path(self._tmp.name).glob(f"step{index}{tag}.*"):
            path.unlink()

    def _session(self, weights: Mapping[str, onnx.TensorProto], store: FrontierStore, plan: StepPlan, tag: str):
        """An ORT session running step ``plan``'s nodes with ``weights``, fed by graph inputs and cached frontier
        tensors; and its feed names.  Only the initializers the nodes read are written (to this object's temp
        folder, as ``step<index><tag>.*``)."""
        graph = self.model.graph
        nodes = [graph.node[position] for position in plan.nodes]
        made = {name for node in nodes for name in node.output}
        names_read = set().union(*(self.node_reads[position] for position in plan.nodes))
        sub = model_shell(self.model)
        sub.graph.node.extend(nodes)
        feeds = []
        for value in graph.input:
            if value.name in names_read and value.name not in weights:
                sub.graph.input.append(value)
                feeds.append(value.name)
        for name in sorted(names_read & plan.cached - made):
            rank = store.get(0, name).ndim
            sub.graph.input.append(onnx.helper.make_tensor_value_info(name, self.dtypes[name], [None] * rank))
            feeds.append(name)
        sub.graph.initializer.extend(weights[t.name] for t in graph.initializer if t.name in names_read)
        sub.graph.value_info.extend(v for v in graph.value_info if v.name in names_read and v.name in made)
        sub.graph.output.extend(onnx.ValueInfoProto(name=name) for name in plan.outputs)
        stem = f"step{plan.index}{tag}"
        path = Path(self._tmp.name) / f"{stem}.onnx"
        onnx.save_model(sub, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{stem}.data", size_threshold=INLINE_TENSOR_BYTES)
        return open_session(str(path), self.threads, shared_arena=True), feeds
