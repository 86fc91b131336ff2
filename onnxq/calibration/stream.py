"""Calibration: stream named model inputs through ONNX Runtime and accumulate layer Hessians ``H = Σ xᵀx``.

Activations live for at most two batches (ORT computes batch i+1 while batch i is accumulated); under ``max_memory``
the keys are split over several passes over the data (:mod:`onnxq.calibration.memory`)."""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calibration.data import (
    CalibrationBatches,
    InputSpec,
    batch_samples,
    check_feed,
    iter_batches,
    model_input_specs,
)
from onnxq.calibration.keys import HessianKey, keys_by_tensor, plan_keys
from onnxq.calibration.memory import measure_activations, plan_passes
from onnxq.calibration.sessions import ORT_THREADS, Feed, SessionFactory, run_session
from onnxq.errors import OnnxqError
from onnxq.ir.targets import Target
from onnxq.stats.hessian import HessianSum
from onnxq.stats.unfold import Unfolding

try:  # ships with scikit-learn; without it BLAS keeps its own thread count
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

SUM_THREADS = 2  # threads adding one batch into the sums: the jobs of HessianSum.parts


@dataclass
class CalibrationStats:
    """What one calibration did: rows per key (normalise with ``H / rows``), passes, time and peak memory."""

    rows: dict[HessianKey, int] = field(default_factory=dict)
    samples: int = 0  # samples per pass
    batches: int = 0  # batches per pass
    passes: int = 0
    keys_per_pass: list[int] = field(default_factory=list)
    seconds: float = 0.0  # wall time
    cpu_seconds: float = 0.0  # process user + system time (wall time misleads on a busy machine)
    peak_rss_bytes: int = 0  # process peak resident memory (getrusage), after calibration
    hessian_bytes: int = 0  # float64 bytes of all H returned

    def merge(self, other: CalibrationStats) -> None:
        self.rows.update(other.rows)
        self.samples, self.batches = other.samples, other.batches
        self.passes += other.passes
        self.keys_per_pass += other.keys_per_pass
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds
        self.peak_rss_bytes = max(self.peak_rss_bytes, other.peak_rss_bytes)
        self.hessian_bytes += other.hessian_bytes


def process_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _as_batches(batches, model: onnx.ModelProto) -> Iterable[Feed]:
    if isinstance(batches, (Mapping, str, os.PathLike)):
        return iter_batches(batches, model=model)
    return batches


def origins(batches: Iterable[Feed]) -> Iterator[tuple[str, Feed]]:
    """``(origin, batch)`` of each batch: the origin names the batch (its file and samples) in error messages."""
    if isinstance(batches, CalibrationBatches):
        yield from batches.with_origin()
    else:
        for index, batch in enumerate(batches):
            yield f"calibration batch {index}", batch


def iter_hessian_passes(
    model: onnx.ModelProto,
    targets: list[Target],
    batches: Iterable[Feed] | str | os.PathLike | Mapping[str, np.ndarray],
    max_memory: int | None = None,
) -> Iterator[tuple[dict[HessianKey, np.ndarray], CalibrationStats]]:
    """Yield ``(H per key, stats)`` once per pass over ``batches``, each pass computing some of the keys.

    The keys of a pass (contiguous in graph order) keep ``Σ H bytes + activations of two batches + working memory``
    under ``max_memory``; the activation bytes are measured on a one-sample probe run and scaled to the first batch.
    A caller that solves each pass's layers and drops their H stays within ``max_memory`` for the calibration data.
    """
    batches = _as_batches(batches, model)
    keys = plan_keys(targets)
    if not keys:
        return
    specs = model_input_specs(model)
    if isinstance(batches, CalibrationBatches):
        batches.check(model)  # every file's names, dtypes and ranks, before the first ORT run
    constants = {t.name: t for t in model.graph.initializer}
    factory = SessionFactory(model, ORT_THREADS)
    try:
        intermediates = [u.tensor for u in keys.values() if u.tensor not in specs and u.tensor not in constants]
        intermediates = list(dict.fromkeys(intermediates))
        passes: list[list[HessianKey]] = [list(keys)]
        probe_session = None
        activation_bytes: dict[str, int] = {}
        one_shot = iter(batches) is batches
        if max_memory is not None:
            first = _first_batch(batches, specs)
            if one_shot:  # put the probed batch back in front
                batches = itertools.chain([first[1]], batches)
            probe_session = factory.session(intermediates) if intermediates else None
            activation_bytes = measure_activations(probe_session, intermediates, first, specs)
            passes = plan_passes(keys, activation_bytes, max_memory)
            if len(passes) > 1:
                probe_session = None
        if len(passes) > 1 and one_shot:
            raise OnnxqError(
                f"calibration needs {len(passes)} passes over the data to fit in max_memory, but the batches are a "
                "one-shot iterator; pass a list or iter_batches(...), or raise max_memory"
            )
        for keys_of_pass in passes:
            start, cpu_start = time.perf_counter(), process_cpu_seconds()
            units = {key: keys[key] for key in keys_of_pass}
            needed = list(dict.fromkeys(u.tensor for u in units.values() if u.tensor in intermediates))
            if len(passes) == 1 and probe_session is not None:
                session = probe_session
            else:
                session = factory.session(needed) if needed else None

            def run(_: int, origin: str, feed: Feed, session=session, needed=needed) -> dict[str, np.ndarray]:
                return run_session(session, needed, feed, origin)

            sums, samples, count, peak_outputs = accumulate_pass(
                run, batches, specs, constants, units,
            )
            session = None
            yield finish_pass(sums, samples, count, peak_outputs, start, cpu_start)
            del sums
        probe_session = None
    finally:
        factory.close()


def accumulate_pass(
    run: Callable[[int, str, Feed], dict[str, np.ndarray]],
    batches: Iterable[Feed],
    specs: Mapping[str, InputSpec],
    constants: Mapping[str, onnx.TensorProto],
    units: Mapping[HessianKey, Unfolding],
    shard_ends: Collection[int] = (),
    keep_shards: bool = False,
    take_float: Callable[[int], dict[str, np.ndarray]] | None = None,
) -> tuple[dict[HessianKey, HessianSum], int, int, int]:
    """One pass over the batches: ``run(index, origin, feed)`` (ORT) computes batch i+1 in a worker thread while
    batch i is added to the sums.  It returns the layer inputs that are not graph inputs or constants.  With
    ``take_float`` (float targets) the sums also get ``C``: ``take_float(i)`` returns batch ``i``'s float-model
    values of the layer inputs that differ (see :class:`HessianSum`); it is called in the calling thread, just
    before batch ``i`` is added, so a wait in it can be interrupted.

    The sums are updated in batch order with single-threaded BLAS (many mid-sized ``syrk`` calls: threading one
    costs more than it gains); a batch's ``H`` update and ``C``'s two row ranges are independent jobs
    (:meth:`HessianSum.parts`) on ``SUM_THREADS`` threads, and each sum's own updates keep batch order, so results
    do not depend on timing.
    At most two batches of activations are alive at once.  After each batch index in ``shard_ends`` the sums
    close their shard (:mod:`onnxq.calibration.shards`): folded into their total, or kept per shard with
    ``keep_shards``.
    """
    sums = {key: HessianSum(unit, take_float is not None, keep_shards) for key, unit in units.items()}
    users = keys_by_tensor(units)
    samples = count = peak_outputs = 0

    def accumulate(index: int, origin: str, feed: Feed, values: dict[str, np.ndarray]) -> None:
        nonlocal samples, count, peak_outputs
        float_values = {} if take_float is None else take_float(index)
        peak_outputs = max(peak_outputs, sum(v.nbytes for part in (values, float_values) for v in part.values()))
        parts = []
        for tensor, keys in users.items():
            x = values.pop(tensor) if tensor in values else _source_value(tensor, feed, constants, origin)
            ref = float_values.pop(tensor, None)
            parts += [part for key in keys for part in sums[key].parts(x, ref)]
            del x, ref
        for done in [sum_pool.submit(part) for part in parts]:
            done.result()
        samples += batch_samples(feed)
        count += 1
        if index in shard_ends:
            for hessian_sum in sums.values():
                hessian_sum.end_shard()

    with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxq-ort") as pool,
          ThreadPoolExecutor(max_workers=SUM_THREADS, thread_name_prefix="onnxq-sums") as sum_pool,
          _single_threaded_blas()):
        pending = None
        for index, (origin, batch) in enumerate(origins(batches)):
            feed = check_feed(specs, batch, origin)
            running = pool.submit(run, index, origin, feed)
            if pending is not None:
                accumulate(*pending)
            pending = (index, origin, feed, running.result())
            del running
        if pending is not None:
            accumulate(*pending)
    return sums, samples, count, peak_outputs


def finish_pass(
    sums: Mapping[HessianKey, HessianSum], samples: int, count: int, peak_outputs: int, start: float, cpu_start: float
) -> tuple[dict[HessianKey, np.ndarray], CalibrationStats]:
    """The symmetric H of each sum and the pass's stats (``start``/``cpu_start``: when the pass began)."""
    if count == 0:
        raise OnnxqError("calibration data holds no batches; pass at least one sample")
    hessians = {key: s.result() for key, s in sums.items()}
    stats = CalibrationStats(
        rows={key: s.rows for key, s in sums.items()},
        samples=samples,
        batches=count,
        passes=1,
        keys_per_pass=[len(sums)],
        seconds=time.perf_counter() - start,
        cpu_seconds=process_cpu_seconds() - cpu_start,
        peak_rss_bytes=process_peak_rss_bytes(),
        hessian_bytes=sum(h.nbytes for h in hessians.values()),
    )
    return hessians, stats


def _single_threaded_blas():
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def collect_hessians(
    model: onnx.ModelProto,
    targets: list[Target],
    batches: Iterable[Feed] | str | os.PathLike | Mapping[str, np.ndarray],
    max_memory: int | None = None,
) -> tuple[dict[HessianKey, np.ndarray], CalibrationStats]:
    """``H = Σ xᵀx`` (float64) for every :func:`hessian_key` of ``targets``, with rows, time and peak memory.

    ``batches``: dicts of named model inputs (re-iterable when ``max_memory`` forces several passes), or an .npz
    path / folder / dict of arrays.  See :func:`iter_hessian_passes` for the memory bound; the returned dict holds
    every H at once.
    """
    start, cpu_start = time.perf_counter(), process_cpu_seconds()
    hessians: dict[HessianKey, np.ndarray] = {}
    stats = CalibrationStats()
    for pass_hessians, pass_stats in iter_hessian_passes(model, targets, batches, max_memory):
        hessians.update(pass_hessians)
        stats.merge(pass_stats)
    stats.seconds = time.perf_counter() - start
    stats.cpu_seconds = process_cpu_seconds() - cpu_start
    stats.peak_rss_bytes = process_peak_rss_bytes()
    return hessians, stats


def _source_value(tensor: str, feed: Feed, constants: Mapping[str, onnx.TensorProto], origin: str) -> np.ndarray:
    """A layer input that is a graph input (from the feed) or an initializer (constant)."""
    if tensor in feed:
        return feed[tensor]
    if tensor in constants:
        return numpy_helper.to_array(constants[tensor])
    raise OnnxqError(f"{origin}: layer input '{tensor}' is neither computed nor fed; the model is inconsistent")


def _first_batch(batches: Iterable[Feed], specs: Mapping[str, InputSpec]) -> tuple[str, Feed]:
    for origin, batch in origins(batches):
        return origin, check_feed(specs, batch, origin)
    raise OnnxqError("calibration data holds no batches; pass at least one sample")
