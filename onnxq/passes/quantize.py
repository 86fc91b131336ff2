"""The quantize pass: find targets, solve each distinct weight once, emit it in the chosen format."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.calibration.data import iter_batches
from onnxq.calibration.distributed import DistributedCalibration
from onnxq.calibration.keys import hessian_key
from onnxq.calibration.sequential import SequentialCalibration
from onnxq.calibration.sessions import release_shared_arena
from onnxq.calibration.shards import shard_ends, shard_ranges
from onnxq.calibration.store import HessianStore
from onnxq.calibration.stream import collect_hessians
from onnxq.config import FAST_ACCURACY_LEVEL, QuantizeConfig
from onnxq.errors import OnnxqError
from onnxq.heap import release_free_memory
from onnxq.ir.llm import LM_HEAD_REASON, embedding_note, lm_head_names
from onnxq.ir.metadata import QUANT_METADATA_KEY, set_metadata, split_branch_nodes
from onnxq.ir.model import model_bytes
from onnxq.ir.targets import (
    Skipped,
    Target,
    TargetReport,
    find_targets,
    initializer_array,
    leave_float,
    other_readers,
)
from onnxq.layer_table import quantized_layer_counts
from onnxq.passes.emit import emit_in_place, raise_opset_for
from onnxq.progress import Progress
from onnxq.quantized_size import quantized_layers
from onnxq.quantized_weight import QuantizedWeight
from onnxq.solve_pool import SolvePool, SolveTaskError
from onnxq.solvers.base import NEEDS_STATS, LayerStats, RowTask, SolveReport, SolverParams, assemble, plan, solve
from onnxq.solvers.grid import off_grid
from onnxq.solvers.grouping import resolve_group_size
from onnxq.spill import SpillFolder


@dataclass
class LayerRecord:
    name: str
    op_type: str
    weight: str
    shape: tuple[int, int]
    format: str
    error: float  # relative Frobenius error of the dequantized weight
    loss_before: float | None = None  # H-weighted loss of RTN (hessian methods)
    loss_after: float | None = None


@dataclass
class QuantizeSummary:
    layers: list[LayerRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    calibration_seconds: float = 0.0
    solve_seconds: float = 0.0  # wall time of the Hessian methods' solves (all workers)
    peak_memory_mb: float = 0.0
    calibration_rows: int = 0  # rows (tokens, pixels) behind the smallest H
    thin_inputs: list[tuple[str, int, int]] = field(default_factory=list)  # (layer input, rows, K) with rows < K
    method_name: str = "method"
    quantized_bytes: float = 0.0  # every tensor the quantized layers use (onnxq.quantized_size)
    quantized_params: int = 0
    scale_storage: str = "float32"

    @property
    def bits_per_weight(self) -> float:
        """All-in bits per weight of the quantized layers: ``8 · bytes / weights``."""
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    def lines(self) -> list[str]:
        out = [f"quantized {len(self.layers)} layers in {self.seconds:.1f}s"
               + (f" (calibration {self.calibration_seconds:.1f}s, solving {self.solve_seconds:.1f}s)"
                  if self.calibration_seconds else "")]
        ratio = self.bytes_before / max(self.bytes_after, 1)
        before, after = self.bytes_before / 1e6, self.bytes_after / 1e6
        out.append(f"weights: {before:.2f} MB -> {after:.2f} MB ({ratio:.2f}x smaller)")
        if self.quantized_params:
            out.append(f"quantized layers: {self.bits_per_weight:.2f} bits per weight all-in "
                       f"({self.quantized_params:,} weights; codes, scales, zero points and float-zero terms; "
                       f"scales and float zeros stored as {self.scale_storage})")
        if self.peak_memory_mb:
            out.append(f"peak memory: {self.peak_memory_mb:.0f} MB")
        solved = [r for r in self.layers if r.loss_before is not None and r.loss_after is not None]
        if solved:
            before = sum(r.loss_before for r in solved)
            after = sum(r.loss_after for r in solved)
            ratios = sorted(r.loss_after / r.loss_before for r in solved if r.loss_before > 0)
            median = ratios[len(ratios) // 2] if ratios else float("nan")
            out.append(f"layer output error on the calibration data, sum over layers of ‖X(W − Ŵ)ᵀ‖² (each layer's "
                       f"own inputs, ≥ {self.calibration_rows:,} rows): RTN {before:.4g} -> {self.method_name} "
                       f"{after:.4g} ({before / max(after, 1e-300):.2f}x lower), median layer ratio {median:.3f}; "
                       "not model quality: check it on other data (onnxq verify, perplexity)")
        if self.thin_inputs:
            name, rows, size = self.thin_inputs[0]
            out.append(f"WARNING: {len(self.thin_inputs)} layer inputs had fewer calibration rows than columns (e.g. "
                       f"'{name}': {rows} rows for {size}): their H is rank-deficient and a low-bit solution can fit "
                       "the calibration data; give more (--calib-samples, a larger .npz)")
        by_reason: dict[tuple[str, str], list[str]] = {}
        for s in self.skipped:
            by_reason.setdefault((s.op_type, s.reason), []).append(s.name)
        for (op_type, reason), names in by_reason.items():
            if len(names) <= 3:
                out.extend(f"skipped {op_type} '{name}': {reason}" for name in names)
            else:
                out.append(f"skipped {len(names)} {op_type} nodes ({reason}): '{names[0]}', '{names[1]}', ...")
        seen: set[str] = set()
        for note in self.notes:
            if note not in seen:
                seen.add(note)
                out.append(f"note: {note}")
        return out

    def layer_log(self) -> str:
        """Tab-separated per-layer table: relative weight error and the H-weighted loss
        tr((W − Ŵ) H (W − Ŵ)ᵀ) of RTN and of the method (hessian methods only)."""
        rows = ["layer\top\tshape\terror\tloss_rtn\tloss_method\tratio"]
        for r in self.layers:
            ratio = r.loss_after / r.loss_before if r.loss_before and r.loss_after is not None else None
            cells = [r.name, r.op_type, "x".join(map(str, r.shape)), f"{r.error:.5g}",
                     *("" if v is None else f"{v:.6g}" for v in (r.loss_before, r.loss_after, ratio))]
            rows.append("\t".join(cells))
        return "\n".join(rows) + "\n"


def _refuse_quantized(model: onnx.ModelProto) -> None:
    """An already quantized input (no float target left) gets its own error, not "no quantizable layers"."""
    counts = quantized_layer_counts(model)
    if counts:
        found = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        raise OnnxqError(f"already quantized ({found}); quantize the float model")


def quantize_in_place(model: onnx.ModelProto, config: QuantizeConfig) -> QuantizeSummary:
    """The quantize pass: rewrite every target weight of ``model`` in place; returns what it did.

    ``config`` has been validated, and its ``calibration`` (when the run calibrates) is one
    :class:`~onnxq.calibration.data.CalibrationBatches` shared by the pipeline's passes (:mod:`onnxq.pipeline`)."""
    start = time.perf_counter()
    summary = QuantizeSummary(bytes_before=model_bytes(model), method_name=config.method)
    report = _find(model, config)
    group_sizes = [resolve_group_size(t.matrix_shape[1], config.group_size) for t in report.targets]
    if raise_opset_for(model, config.format, report.targets, group_sizes, config.bits):
        report = _find(model, config)
    summary.skipped = report.skipped
    if not report.targets:
        _refuse_quantized(model)
        raise OnnxqError(
            "no quantizable layers found (MatMul/Gemm/Conv with a constant weight"
            + (", matching --include/--exclude/--op-types" if config.include or config.exclude else "")
            + ")" + _skipped_hint(report.skipped) + "; run 'onnxq inspect' to see why"
        )
    branch_nodes = split_branch_nodes(model)
    products = [t for t in report.targets if not t.is_lookup]
    lookups = [t for t in report.targets if t.is_lookup]
    _check_tied(products, lookups, config)
    codes = SpillFolder("onnxq-codes-")  # solved codes wait on disk for the emitters (1 byte per weight)
    try:
        solved = _solve_all(model, products, config, branch_nodes, summary, codes) if products else {}
        _solve_lookups(model, lookups, products, config, solved, branch_nodes, summary)
        note = embedding_note(model, config.op_types)
        if note:
            summary.notes.append(note)
        storage = np.dtype(config.resolved_scale_storage)
        notes = emit_in_place(model, report.targets, solved, config.format, config.resolved_accuracy_level,
                              {t.matrix_key: storage for t in report.targets})
        solved = None
    finally:
        codes.close()
    if config.format == "matmulnbits" and config.accuracy_level is None and config.bits <= 3:
        notes.append(f"MatMulNBits accuracy_level {FAST_ACCURACY_LEVEL} (int8 activations) by default at {config.bits} "
                     "bits: fast on stock ONNX Runtime; --accuracy-level 0 keeps fp32 activations (exact, ~15x slower "
                     "decoding at 2 bits), --format onnxq is exact and fast with the onnxq op library")
    set_metadata(model, QUANT_METADATA_KEY, json.dumps(
        {"method": config.method, "bits": config.bits, "group_size": config.group_size, "format": config.format,
         "symmetric": config.symmetric}, sort_keys=True))
    summary.notes += notes
    summary.bytes_after = model_bytes(model)
    layers = quantized_layers(model)
    summary.quantized_bytes = sum(layer.bytes for layer in layers)
    summary.quantized_params = sum(layer.params for layer in layers)
    summary.scale_storage = "float16" if any(t.dtype == onnx.TensorProto.FLOAT16 for t in report.targets) \
        else config.resolved_scale_storage
    summary.seconds = time.perf_counter() - start
    return summary


def _find(model: onnx.ModelProto, config: QuantizeConfig) -> TargetReport:
    """The targets ``config`` selects; a language model's output projection is left float unless asked."""
    report = find_targets(model, config.op_types, config.include, config.exclude)
    if not config.quantize_lm_head:
        leave_float(report, lm_head_names(model, report.targets), LM_HEAD_REASON)
    for target in [t for t in report.targets if t.is_lookup]:
        readers = other_readers(model, target, report.targets)
        if readers:
            hint = " (add --quantize-lm-head to quantize both as one table)" if any(
                s.name == readers[0] and s.reason == LM_HEAD_REASON for s in report.skipped) else ""
            leave_float(report, {target.name}, f"its table '{target.weight_name}' is also read by '{readers[0]}', "
                        f"which stays float: quantizing the lookup alone would store the table twice{hint}")
    return report


def _check_tied(products: list[Target], lookups: list[Target], config: QuantizeConfig) -> None:
    """A lookup whose table a product also quantizes takes the product's solution: refuse float zeros, which
    GatherBlockQuantized and a DequantizeLinear lookup cannot hold."""
    zero = config.zero_convention or ("float" if config.method == "decoupleq" else "integer")
    keys = {t.matrix_key: t for t in products}
    tied = next((t for t in lookups if t.matrix_key in keys), None)
    if tied is not None and zero == "float" and config.format != "fake":
        raise OnnxqError(f"Gather '{tied.name}' shares its table with {keys[tied.matrix_key].op_type} "
                         f"'{keys[tied.matrix_key].name}', whose float zeros ({config.method}) a quantized lookup "
                         "cannot hold; use integer zero points (--method gptq or rtn, without --zero float), or "
                         "leave one of them float (--exclude)")


def _solve_lookups(model: onnx.ModelProto, lookups: list[Target], products: list[Target], config: QuantizeConfig,
                   solved: dict[tuple[str, str], QuantizedWeight], branch_nodes: set[str],
                   summary: QuantizeSummary) -> None:
    """Solve each lookup table not already solved for a product: RTN with integer zero points, asymmetric, groups
    along the hidden axis (a lookup has no input statistics), whatever the method; a table a product also reads
    keeps the product's solution (one table for both)."""
    rtn = dataclasses.replace(config, method="rtn", symmetric=False, zero_convention="integer", clip_search=False)
    names = {t.matrix_key: t.name for t in products}
    for target in lookups:
        if target.matrix_key in names:
            summary.notes.append(f"Gather '{target.name}': its table is the weight of '{names[target.matrix_key]}', "
                                 f"quantized once ({config.method}) for both")
        elif target.matrix_key not in solved:
            job = _LayerJob.of(model, target, rtn, None, branch_nodes)
            solved[target.matrix_key] = job.record(*solve(job.weight, job.params, None, job.zero_mask), rtn, summary)
            summary.notes.append(f"Gather '{target.name}': table quantized by RTN (asymmetric, integer zero points, "
                                 "groups along the hidden axis; a lookup has no input statistics)"
                                 + (f", not {config.method}" if config.method != "rtn" else ""))


def _skipped_hint(skipped: list[Skipped]) -> str:
    """``: N layers skipped, e.g. 'name' (reason)`` for the no-targets error (empty when nothing was skipped)."""
    if not skipped:
        return ""
    first = skipped[0]
    return f": {len(skipped)} layers skipped, e.g. '{first.name}' ({first.reason})"


def _solve_all(
    model: onnx.ModelProto, targets: list[Target], config: QuantizeConfig, branch_nodes: set[str],
    summary: QuantizeSummary, codes: SpillFolder,
) -> dict[tuple[str, str], QuantizedWeight]:
    """Solve every distinct weight matrix once (a weight read in two orientations is two matrices, see
    :attr:`Target.matrix_key`); Hessian methods calibrate first (group by group when sequential).  Each solved
    weight's codes go to ``codes`` (a memory-mapped file) as its group finishes: a 1 B model's would otherwise
    grow the process by 1 GB by the end."""
    solved: dict[tuple[str, str], QuantizedWeight] = {}
    store = sequential = None
    layer_groups = [targets]
    if config.method != "rtn":
        batches = iter_batches(config.calibration, model=model)
        batches.check(model)
        store = HessianStore(config.damp, act_order=config.method == "decoupleq" or config.act_order)
        if config.sequential:
            layer_groups = layer_groups_of(targets)
            frontier_limit = None if config.max_memory is None else config.max_memory // 2
            ranges = shard_ranges(len(batches), config.calib_shards)
            if config.ray is not None:
                sequential = DistributedCalibration(model, layer_groups, batches, ranges, config.ray,
                                                    config.ray_workers, frontier_limit, config.float_target)
                summary.notes.append(f"calibration on Ray: {sequential.workers} actors, {len(ranges)} shards of "
                                     f"{len(batches)} batches ({', '.join(sequential.places)})")
            else:
                sequential = SequentialCalibration(model, layer_groups, batches, frontier_limit,
                                                   float_targets=config.float_target, shard_ends=shard_ends(ranges))
            fit = ", each layer fit to the float model's output" if config.float_target else ""
            summary.notes.append(f"sequential calibration: {len(layer_groups)} layer groups{fit}")
    later_keys = _keys_read_later(layer_groups)
    try:
        solvers = sequential if isinstance(sequential, DistributedCalibration) else SolvePool(config.workers)
        with solvers as pool, Progress(len(targets), "quantize", config.progress) as bar:
            for index, group in enumerate(layer_groups):
                if sequential is not None:
                    hessians, stats, crosses = sequential.step(index)
                    _record_calibration(store, summary, hessians, stats, crosses)
                elif store is not None:
                    _record_calibration(store, summary, *collect_hessians(model, group, batches, config.max_memory))
                jobs = {}
                for target in group:
                    if target.matrix_key not in solved and target.matrix_key not in jobs:
                        jobs[target.matrix_key] = _LayerJob.of(model, target, config, store, branch_nodes)
                if isinstance(sequential, SequentialCalibration) and _needs_release(jobs.values()):
                    release_shared_arena()  # the solve needs the pages more than the next step does
                solve_start = time.perf_counter()
                results = _solve_jobs(list(jobs.values()), pool)
                summary.solve_seconds += time.perf_counter() - solve_start
                for job, (qw, report) in zip(jobs.values(), results, strict=True):
                    record = job.record(qw, report, config, summary)
                    solved[job.target.matrix_key] = dataclasses.replace(record, codes=codes.put(record.codes))
                    if sequential is not None:
                        dtype = onnx.helper.tensor_dtype_to_np_dtype(job.target.dtype)
                        sequential.commit(job.target.weight_name,
                                          job.target.initializer_from_matrix(qw.dequantize(dtype)))
                if store is not None:
                    store.forget({hessian_key(t) for t in group} - later_keys[index])
                jobs = results = None
                release_free_memory()  # the group's weights, statistics and task buffers are gone
                for target in group:
                    bar.step(target.name)
    finally:
        if sequential is not None:
            sequential.close()
    return solved


ARENA_RELEASE_BYTES = 128 * 2**20  # a solve with a K × K float64 matrix this large releases the calibration arena


def _needs_release(jobs) -> bool:
    """Whether a group's solve is large enough (``K ≥ 4096``: a 1 B model's ``down_proj``) to release the arena's
    retained calibration activations first; SmolLM2-sized groups keep them for the next step."""
    return any(job.weight.shape[1] ** 2 * 8 >= ARENA_RELEASE_BYTES for job in jobs)


@dataclass(frozen=True)
class _LayerJob:
    """One weight matrix to solve: its float64 ``W[N, K]``, the method's params, statistics and zero mask."""

    target: Target
    weight: np.ndarray
    params: SolverParams
    stats: LayerStats | None
    zero_mask: np.ndarray | None
    scale_dtype: type

    @classmethod
    def of(cls, model: onnx.ModelProto, target: Target, config: QuantizeConfig, store, branch_nodes: set[str]
           ) -> _LayerJob:
        weight = target.matrix_from_initializer(initializer_array(model, target.weight_name)).astype(np.float64)
        if not np.all(np.isfinite(weight)):
            raise OnnxqError(f"weight '{target.weight_name}' of {target.op_type} node '{target.name}' contains NaN "
                             "or Inf; fix the model, or leave the node in float with --exclude")
        fp16 = target.dtype == onnx.TensorProto.FLOAT16
        scale_dtype = np.float16 if fp16 else np.dtype(config.resolved_scale_storage).type
        params = config.solver_params(resolve_group_size(weight.shape[1], config.group_size), scale_dtype)
        stats = store.layer_stats(target) if NEEDS_STATS[config.method] else None
        zero_mask = (weight == 0) if target.name in branch_nodes else None
        return cls(target, weight, params, stats, zero_mask, scale_dtype)

    def record(self, qw: QuantizedWeight, report: SolveReport, config: QuantizeConfig,
               summary: QuantizeSummary) -> QuantizedWeight:
        """Check the solved weight's grid, add its line to the summary; returns ``qw``."""
        target, weight = self.target, self.weight
        dequantized = qw.dequantize(np.float64)
        if report.nearest:
            _check_grid(target, weight, qw, dequantized, self.scale_dtype, summary)
        err = float(np.linalg.norm(dequantized - weight) / max(np.linalg.norm(weight), 1e-30))
        summary.layers.append(LayerRecord(target.name, target.op_type, target.weight_name, target.matrix_shape,
                                          config.format, err, report.loss_rtn, report.loss_method))
        return qw


def _solve_jobs(jobs: list[_LayerJob], pool: SolvePool) -> list[tuple[QuantizedWeight, SolveReport]]:
    """Solve a layer group's weights; the row tasks of all of them go to ``pool`` at once."""
    plans: list[list[RowTask]] = []
    for job in jobs:
        if job.stats is None:
            plans.append([])
            continue
        try:
            plans.append(plan(job.weight, job.params, job.stats, job.zero_mask))
        except OnnxqError as exc:
            raise OnnxqError(f"{job.target.op_type} node '{job.target.name}': {exc}") from None
    owners = [job for job, tasks in zip(jobs, plans, strict=True) for _ in tasks]
    try:
        results = iter(pool.run([task for tasks in plans for task in tasks]))
    except SolveTaskError as exc:  # the solvers know matrices, not nodes
        target = owners[exc.index].target
        raise OnnxqError(f"{target.op_type} node '{target.name}': {exc.message}") from None
    solved = []
    for job, tasks in zip(jobs, plans, strict=True):
        if job.stats is None:
            solved.append(solve(job.weight, job.params, None, job.zero_mask))
        else:
            solved.append(assemble([next(results) for _ in tasks]))
    return solved


def _check_grid(
    target: Target, weight: np.ndarray, qw: QuantizedWeight, dequantized: np.ndarray, dtype: type,
    summary: QuantizeSummary,
) -> None:
    """Warn, naming the layer, when a round-to-nearest weight is off its own grid by more than half a step
    (it cannot be unless the range was shrunk on purpose: a failing check is a bug to report)."""
    bad = off_grid(weight, qw, dtype, dequantized)
    if bad.any():
        summary.notes.append(f"WARNING: layer '{target.name}': {int(bad.sum())} of {bad.size} weights are off their "
                             "grid by more than half a step (a bug: please report it with the model)")


def _record_calibration(store, summary: QuantizeSummary, hessians: dict, stats, crosses: dict | None = None) -> None:
    store.update(hessians, crosses)
    for key, rows in stats.rows.items():
        size = hessians[key].shape[-1]
        summary.calibration_rows = rows if not summary.calibration_rows else min(summary.calibration_rows, rows)
        if rows < size:
            summary.thin_inputs.append((key[0], rows, size))
    summary.calibration_seconds += stats.seconds
    summary.peak_memory_mb = max(summary.peak_memory_mb, stats.peak_rss_bytes / 2**20)


def _keys_read_later(layer_groups: list[list[Target]]) -> list[set]:
    """Per group index, the Hessian keys that the groups after it read."""
    later: list[set] = [set() for _ in layer_groups]
    seen: set = set()
    for index in range(len(layer_groups) - 1, -1, -1):
        later[index] = set(seen)
        seen |= {hessian_key(t) for t in layer_groups[index]}
    return later


def layer_groups_of(targets: list[Target]) -> list[list[Target]]:
    """Consecutive targets that read the same activation (q/k/v, gate/up) form one group, in graph order."""

    groups: list[list[Target]] = []
    last_key = None
    for target in targets:
        key = hessian_key(target)
        if groups and key == last_key:
            groups[-1].append(target)
        else:
            groups.append([target])
        last_key = key
    return groups
