"""The solver registry: ``solve(W, params, stats, zero_mask) -> (QuantizedWeight, SolveReport)``, one weight at a time.

Each method has one frozen params type; a method's options are exactly the fields of its type, so an option a
method does not support cannot be given to it (:data:`PARAMS` maps method names to the types).

* :class:`RtnParams`: round to nearest on the min/max grid (:mod:`onnxq.solvers.rtn`), no statistics;
* :class:`GptqParams` and :class:`DecoupleqParams`: minimise ``(w − q) H (w − q)ᵀ`` per row given the layer's
  :class:`LayerStats` (:mod:`onnxq.solvers.gptq`, :mod:`onnxq.solvers.decoupleq`).

Rules that hold for every method, applied here once:

* **conv groups**: a grouped Conv has one Hessian per conv group; its output channels
  ``c·N/C … (c+1)·N/C`` are solved against ``H[c]`` and the pieces stacked back along N;
* **row tasks**: every Hessian method treats rows independently (each row's loss, grid and codes depend on that
  row alone), so a layer is solved as :class:`RowTask` pieces that may run in other processes
  (:mod:`onnxq.solve_pool`); each runs with one BLAS thread, so the bytes never depend on where it ran;
* **float targets**: with ``C = Σ xᵀx_float`` in the stats, the Hessian methods fit
  :func:`~onnxq.solvers.hessian.float_output_target`'s ``W̃`` instead of ``W``;
* **zero masks** (SplitQuant branches, whose zeros must dequantize to exactly 0): the integer zero point is used,
  masked entries get the code ``zp``; RTN also searches the clip range then, since a branch's zeros are on the
  grid whatever the range (``docs/splitquant.md`` measures why);
* **storage dtype**: scales and float zeros are rounded to ``scale_dtype`` (float16 for fp16 models, and for fp32
  models whose outputs store them in float16: ``--scale-storage``), so the dequantized reference equals what runs;
  every method solves on that grid (RTN/GPTQ round scales up to it, decoupleQ alternates on it), and the reported
  losses are those of the stored weights.

The report holds the undamped H-weighted losses ``Σ_rows (w̃ − q) H (w̃ − q)ᵀ`` of plain RTN (rounding ``W``)
and of the method, against the same target ``W̃`` (Hessian methods only).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from threadpoolctl import threadpool_limits

from onnxq.quantized_weight import QuantizedWeight, stack_rows
from onnxq.solvers.decoupleq import quantize_decoupleq
from onnxq.solvers.gptq import quantize_gptq
from onnxq.solvers.grid import ZeroConvention
from onnxq.solvers.hessian import PreparedHessian, float_output_target
from onnxq.solvers.rtn import quantize_rtn


@dataclass(frozen=True)
class RtnParams:
    """Round to nearest: ``c = clip(round((w − z)/s) + zp)`` on the group's min/max grid."""

    bits: int
    group_size: int  # resolved: columns per quantization group (K for per channel)
    symmetric: bool = False
    zero_convention: ZeroConvention = "integer"
    clip_search: bool = False  # MSE-optimal range shrinking per group (the only case where values may be clipped)
    scale_dtype: type = np.float32


@dataclass(frozen=True)
class GptqParams:
    """GPTQ: column sweep with the rounding error propagated through the Cholesky factor of ``H_d⁻¹``."""

    bits: int
    group_size: int
    symmetric: bool = False
    zero_convention: ZeroConvention = "integer"
    damp: float = 0.01  # H_d = H + damp·mean(diag H)·I
    act_order: bool = False
    scale_dtype: type = np.float32


@dataclass(frozen=True)
class DecoupleqParams:
    """decoupleQ: integer codes and float ``(s, z)`` solved alternately (float zero convention)."""

    bits: int
    group_size: int
    iters: int = 4
    damp: float = 0.01
    round_mode: Literal["gptq", "train"] = "gptq"
    scale_dtype: type = np.float32


SolverParams = RtnParams | GptqParams | DecoupleqParams
PARAMS: dict[str, type] = {"rtn": RtnParams, "gptq": GptqParams, "decoupleq": DecoupleqParams}
NEEDS_STATS = {"rtn": False, "gptq": True, "decoupleq": True}


@dataclass(frozen=True)
class LayerStats:
    """What calibration hands a layer: per conv group (one entry for MatMul/Gemm) the prepared ``H`` and, with
    float targets, ``C = Σ xᵀx_float`` (else None)."""

    hessians: tuple[PreparedHessian, ...]
    crosses: tuple[np.ndarray | None, ...]


@dataclass(frozen=True)
class SolveReport:
    """Undamped H-weighted losses of plain RTN and of the method (None for RTN, which has no statistics)."""

    loss_rtn: float | None = None
    loss_method: float | None = None
    nearest: bool = False  # every weight was rounded to its nearest grid point (RTN, range not shrunk)


ROWS_PER_TASK = 512  # at most this many rows per solve task: a layer group's tasks run in parallel


@dataclass(frozen=True)
class RowTask:
    """Rows of one weight solved against one Hessian (one conv group, or part of one: rows are independent)."""

    original: np.ndarray  # the rows of W as given (float64)
    hessian: PreparedHessian
    cross: np.ndarray | None  # C = Σ xᵀx_float with float targets (the rows are fit to W̃), else None
    mask: np.ndarray | None
    params: GptqParams | DecoupleqParams

    @property
    def rows(self) -> int:
        return self.original.shape[0]


@dataclass(frozen=True)
class RowResult:
    """A task's quantized rows (as stored) and their undamped losses against the task's target."""

    weight: QuantizedWeight
    loss_rtn: float
    loss_method: float


def solve(
    weight: np.ndarray,
    params: SolverParams,
    stats: LayerStats | None = None,
    zero_mask: np.ndarray | None = None,
    run: Callable[[list[RowTask]], list[RowResult]] | None = None,
) -> tuple[QuantizedWeight, SolveReport]:
    """Quantize ``weight[N, K]`` (float64) with the method of ``params``; see the module docstring for the rules.

    Hessian methods split the rows into :func:`plan`'s tasks; ``run`` executes them (default: here, in order,
    e.g. :meth:`onnxq.solve_pool.SolvePool.run` to use several processes: the result is the same bytes)."""
    if zero_mask is not None and not zero_mask.any():
        zero_mask = None
    if isinstance(params, RtnParams):
        if zero_mask is not None:
            params = replace(params, zero_convention="integer", clip_search=True)
        qw = quantize_rtn(weight, params.bits, params.group_size, params.symmetric, params.zero_convention,
                          params.clip_search, scale_dtype=params.scale_dtype)
        return _stored_as(qw, params.scale_dtype), SolveReport(nearest=not params.clip_search)
    if stats is None:
        raise ValueError(f"{type(params).__name__} needs LayerStats (calibration)")
    tasks = plan(weight, params, stats, zero_mask)
    return assemble(run(tasks) if run is not None else [run_task(task) for task in tasks])


def plan(
    weight: np.ndarray, params: GptqParams | DecoupleqParams, stats: LayerStats, zero_mask: np.ndarray | None
) -> list[RowTask]:
    """The row tasks of a Hessian method: per conv group, its rows in near-equal parts of at most
    :data:`ROWS_PER_TASK` rows (each task computes its rows' float target ``W̃``).  The split depends on the shape
    only, never on how tasks are run."""
    conv_groups = len(stats.hessians)
    rows = weight.shape[0] // conv_groups
    tasks = []
    for c, (hessian, cross) in enumerate(zip(stats.hessians, stats.crosses, strict=True)):
        original = weight[c * rows : (c + 1) * rows]
        mask = None if zero_mask is None else zero_mask[c * rows : (c + 1) * rows]
        parts = -(-rows // ROWS_PER_TASK)
        for start, stop in itertools.pairwise(np.linspace(0, rows, parts + 1).round().astype(int)):
            tasks.append(RowTask(original[start:stop], hessian, cross, None if mask is None else mask[start:stop],
                                 params))
    return tasks


def run_task(task: RowTask) -> RowResult:
    """Solve one task with one BLAS thread (so its bytes are the same in any process) and measure its losses."""
    with threadpool_limits(limits=1):
        return _solve_rows(task)


def assemble(results: list[RowResult]) -> tuple[QuantizedWeight, SolveReport]:
    """The layer from its tasks' results, in plan order; losses summed in that order."""
    report = SolveReport(sum(r.loss_rtn for r in results), sum(r.loss_method for r in results))
    return stack_rows([r.weight for r in results]), report


def _solve_rows(task: RowTask) -> RowResult:
    params, mask = task.params, task.mask
    target = task.original if task.cross is None else float_output_target(task.original, task.hessian, task.cross)
    if isinstance(params, GptqParams):
        qw = quantize_gptq(target, task.hessian, params.bits, params.group_size, params.symmetric,
                           params.zero_convention, params.damp, params.act_order, zero_mask=mask,
                           scale_dtype=params.scale_dtype)
        zero_convention, symmetric = params.zero_convention, params.symmetric
        qw = _stored_as(qw, params.scale_dtype)  # the losses are those of the weights as stored
        loss_method = None
    else:  # decoupleQ solves on the stored grid and measures its result's loss
        qw, stats = quantize_decoupleq(target, task.hessian, params.bits, params.group_size, iters=params.iters,
                                       damp=params.damp, round_mode=params.round_mode, zero_mask=mask,
                                       param_dtype=params.scale_dtype)
        zero_convention, symmetric, loss_method = "float", False, stats["raw_loss_final"]
    if loss_method is None:
        loss_method = float(task.hessian.undamped_loss(target, qw.dequantize(np.float64)).sum())
    rtn = quantize_rtn(task.original, params.bits, params.group_size, symmetric,
                       "integer" if mask is not None else zero_convention, scale_dtype=params.scale_dtype)
    return RowResult(qw, float(task.hessian.undamped_loss(target, rtn.dequantize(np.float64)).sum()), loss_method)


def _stored_as(qw: QuantizedWeight, dtype: type) -> QuantizedWeight:
    """``qw`` with scales and float zeros as ``dtype`` stores them (values kept in float32 arrays)."""
    if np.dtype(dtype) == np.float32:
        return qw
    float_zeros = None if qw.float_zeros is None else qw.float_zeros.astype(dtype).astype(np.float32)
    return QuantizedWeight(qw.codes, qw.scales.astype(dtype).astype(np.float32), qw.zero_points, float_zeros,
                           qw.bits, qw.group_size)
