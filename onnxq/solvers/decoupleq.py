"""decoupleQ: a layer's quantization as constrained least squares, solved by alternating integer and float steps.

Per output channel (a row ``w`` of ``W[N, K]``) and with the damped layer Hessian ``H`` (see
:mod:`onnxq.solvers.hessian`), minimise ``ℓ(q) = (w − q) H (w − q)ᵀ`` over ``q_k = s_g·a_k + z_g`` (``g`` the group
of column ``k``), where the integers ``a_k ∈ [−2^(b−1), 2^(b−1)−1]`` and the floats ``(s_g, z_g)`` are decoupled:

* **initialisation**: min/max RTN grid, then a GPTQ rounding pass on that grid; keep per channel the better one.
  With ``grid_search`` also: the range shrunk by the ``p ∈ [min_shrink, 1]`` of least ``ℓ`` per channel, the
  float step on those codes, and GPTQ re-rounding on the resulting grid, each kept where it is better;
* **float step** (``a`` fixed): ``ℓ`` is quadratic in ``θ = (s_1…s_G, z_1…z_G)``; closed-form least squares, a
  ``2G×2G`` system per channel solved in float64 for all channels at once (:mod:`onnxq.solvers.least_squares`);
* **integer step** (``s, z`` fixed): GPTQ rounding on the channel's grid (column sweep with error propagation through
  the Cholesky factor of ``H⁻¹``, act-order by default, :mod:`onnxq.solvers.gptq`), or ``round_mode="train"``:
  projected gradient descent on the box-relaxed weights with progressive rounding; then, from the best codes so far,
  ``refine_sweeps`` sweeps of exact coordinate descent over single codes (:mod:`onnxq.solvers.rounding`);
* every candidate is accepted per channel only where ``ℓ`` drops, so the loss never increases; a channel's
  alternation stops after ``iters`` rounds or at the first round that does not improve it (the steps are
  deterministic functions of the channel's own state, so no later round could).  The steps and the acceptance use
  the ranking loss (``K × K`` products in float32, float64 sums: :func:`onnxq.solvers.hessian.ranking_loss`); the
  float step gives its stored ``θ``'s loss, and the current one's, by the closed form of its normal equations (same
  products; measured within 2e-5 relative of the float64 loss on real layers, median 5e-7), so "drops" holds to
  that precision; the loss reported for the result is float64.

Storage (float zero convention): ``codes = a + 2^(b−1)``, ``zero_points = 2^(b−1)``, ``float_zeros = z``.  With a
``zero_mask`` (SplitQuant branches) the integer zero-point convention is used instead — ``q = s_g·(c − zp_g)``,
``zp_g`` an integer fixed by the (grid) min/max fit, masked entries get ``c = zp_g`` and dequantize to exactly 0 —
and the float step solves only ``s``.  Channels are independent: a caller may split the rows (the solver registry
does, :func:`onnxq.solvers.base.plan`) and get the same rows back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.quantized_weight import QuantizedWeight, expand_groups
from onnxq.solvers.gptq import check_hessian_size, check_mask, check_weight, gptq_round
from onnxq.solvers.grid import nearest_codes, safe_inverse
from onnxq.solvers.grouping import resolve_group_size
from onnxq.solvers.hessian import PreparedHessian, layer_loss, no_worse_than, prepare_hessian, ranking_loss
from onnxq.solvers.least_squares import ScaleLeastSquares, fit_float_params
from onnxq.solvers.rounding import GroupGrid, coordinate_descent, relaxed_rounding
from onnxq.solvers.rtn import quantize_rtn

RoundMode = Literal["gptq", "train"]

__all__ = ["quantize_decoupleq", "layer_loss", "fit_float_params"]


@dataclass(frozen=True)
class _Config:
    bits: int
    group_size: int
    integer_zero: bool  # masked mode: q = s·(c − zp), no float_zeros
    iters: int
    round_mode: RoundMode
    grid_search: bool
    grid_points: int
    min_shrink: float
    act_order: bool
    refine_sweeps: int
    train_stages: int
    train_steps: int
    param_dtype: np.dtype  # storage type of s and z: every grid the alternation accepts is representable in it


def quantize_decoupleq(
    weight: np.ndarray,
    hessian: np.ndarray | PreparedHessian,
    bits: int,
    group_size: int = 64,
    iters: int = 4,
    damp: float = 0.01,
    round_mode: RoundMode = "gptq",
    grid_search: bool = True,
    zero_mask: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
    act_order: bool = True,
    grid_points: int = 8,
    min_shrink: float = 0.6,
    refine_sweeps: int = 1,
    train_stages: int = 8,
    train_steps: int = 25,
    param_dtype: np.dtype | type = np.float32,
) -> tuple[QuantizedWeight, dict]:
    """Solve ``min (w − q) H (w − q)ᵀ``, ``q = s·a + z`` per channel/group, by alternating integer and float steps.

    ``hessian`` is ``Σ xᵀx`` (``[K, K]``) or a :class:`PreparedHessian` shared between layers reading one input.
    Returns the ``QuantizedWeight`` and stats: ``loss_rtn``, ``loss_init`` and ``losses`` (sums over channels of
    the damped objective as ranked, per iteration for ``losses``), ``improved`` (per iteration), ``loss_final`` (the
    damped objective of the returned weight, float64), ``raw_loss_rtn``/``raw_loss_final``
    (undamped ``H``), ``damp`` (λ used), ``iterations``, ``seconds`` and ``rows_from_rtn``: rows whose undamped
    loss would exceed plain RTN's are replaced by the RTN row, so the result is never worse than RTN.

    ``param_dtype`` (float16: the storage of scales and float zeros in a compact output) puts the whole alternation
    on the stored grid: the initial grids are rounded to it, and each float step's ``θ`` is rounded to it before its
    loss is compared, so the integer steps round codes on the parameters that will be stored and the loss reported
    is that of the stored weight.  float32 keeps the float64 alternation (stored as float32 at the end).
    """
    start = time.perf_counter()
    weight = check_weight(weight, bits)
    n, k = weight.shape
    if round_mode not in ("gptq", "train"):
        raise OnnxqError(f"round_mode must be 'gptq' or 'train', got {round_mode!r}")
    if iters < 0:
        raise OnnxqError(f"iters must be >= 0, got {iters}")
    group_size = resolve_group_size(k, group_size)
    prepared = prepare_hessian(hessian, damp, act_order=act_order)
    check_hessian_size(prepared, k)
    mask = check_mask(zero_mask, weight.shape)
    target = weight if mask is None else np.where(mask, 0.0, weight)
    config = _Config(
        bits=bits,
        group_size=group_size,
        integer_zero=mask is not None,
        iters=int(iters),
        round_mode=round_mode,
        grid_search=grid_search,
        grid_points=max(2, int(grid_points)),
        min_shrink=float(min_shrink),
        act_order=act_order,
        refine_sweeps=max(0, int(refine_sweeps)),
        train_stages=max(1, int(train_stages)),
        train_steps=max(1, int(train_steps)),
        param_dtype=np.dtype(param_dtype),
    )
    result, stats = _solve_rows(target, mask, prepared, config, log)
    stats["iterations"] = len(stats["losses"])

    qweight = QuantizedWeight(
        codes=result.codes,
        scales=result.scales.astype(np.float32),
        zero_points=result.zero_points.astype(np.uint8),
        float_zeros=None if config.integer_zero else result.float_zeros.astype(np.float32),
        bits=bits,
        group_size=group_size,
    )
    rtn = quantize_rtn(target, bits, group_size, zero_convention="integer" if config.integer_zero else "float",
                       scale_dtype=config.param_dtype)
    guarded = no_worse_than(target, prepared, qweight, rtn)
    qweight = guarded.weight
    error = target - qweight.dequantize(np.float64)
    stats["loss_final"] = float((guarded.loss + prepared.shift * np.einsum("nk,nk->n", error, error)).sum())
    stats["rows_from_rtn"] = int(guarded.taken.sum())
    stats["raw_loss_rtn"] = float(guarded.loss_reference.sum())
    stats["raw_loss_final"] = float(guarded.loss.sum())
    stats["damp"] = prepared.damp
    stats["seconds"] = time.perf_counter() - start
    if log is not None:
        log(
            f"decoupleQ W{bits} g{group_size} [{n}x{k}]: loss rtn {stats['loss_rtn']:.4g} -> init "
            f"{stats['loss_init']:.4g} -> final {stats['loss_final']:.4g} "
            f"({stats['iterations']} iters, {stats['seconds']:.2f} s)"
        )
    return qweight, stats


def _solve_rows(
    target: np.ndarray,
    mask: np.ndarray | None,
    prepared: PreparedHessian,
    config: _Config,
    log: Callable[[str], None] | None,
) -> tuple[GroupGrid, dict]:
    """The whole alternation for a chunk of channels (rows are independent).

    Every step's candidate for a row depends on that row's state alone, so a row no step improved in an iteration
    would get the same candidates in the next one: it is done.  Iterations run on the rows still improving only
    (the result of a row does not depend on which other rows share its chunk)."""
    hessian = prepared.damped
    hessian32 = hessian.astype(np.float32)  # the ranking products' operands (onnxq.solvers.hessian)
    order = prepared.act_order() if config.act_order else None
    problem = _Rows(target, mask, ScaleLeastSquares.build(target, hessian, config.group_size, hessian32))
    steps = _Steps(config, hessian, hessian32, prepared.inverse_cholesky_upper(order), order)

    best = _rtn_grid(target, mask, config)
    loss = steps.loss_of(problem, best)
    stats: dict = {"loss_rtn": float(loss.sum())}
    rtn = best.with_codes(best.codes.copy())
    rtn_loss = loss.copy()
    _accept(best, loss, *steps.integer(problem, best))
    if config.grid_search:
        grid = _grid_search(target, mask, config, hessian32, rtn, rtn_loss)
        _accept(best, loss, grid, steps.loss_of(problem, grid))
        fitted, fitted_loss, _ = steps.float(problem, grid)
        _accept(best, loss, fitted, fitted_loss)
        _accept(best, loss, *steps.integer(problem, fitted))
    stats["loss_init"] = float(loss.sum())

    losses, improved = [], []
    active = np.arange(target.shape[0])
    for _ in range(config.iters):
        if active.size == 0:
            break
        rows = problem.rows(active)
        row_best, row_loss = best.rows(active), loss[active]
        changed = _accept(row_best, row_loss, *steps.float(rows, row_best))
        changed |= _accept(row_best, row_loss, *steps.integer(rows, row_best))
        if config.refine_sweeps:
            changed |= _accept(row_best, row_loss, *steps.refine(rows, row_best, row_loss))
        best.take(active, row_best, source_rows=slice(None))
        loss[active] = row_loss
        active = active[changed]
        losses.append(float(loss.sum()))
        improved.append(int(changed.sum()))
        if log is not None:
            log(f"  iteration {len(losses)}: loss {losses[-1]:.6g}, {improved[-1]} channels improved")
    stats.update(losses=losses, improved=improved)
    return best, stats


@dataclass(frozen=True)
class _Rows:
    """The per-row data of a chunk: targets, zero mask and the float step's normal equations."""

    target: np.ndarray
    mask: np.ndarray | None
    least_squares: ScaleLeastSquares

    def rows(self, index: np.ndarray) -> _Rows:
        return _Rows(self.target[index], None if self.mask is None else self.mask[index],
                     self.least_squares.rows(index))


@dataclass(frozen=True)
class _Steps:
    """The alternation's steps; each returns a candidate grid and its loss per row of the given :class:`_Rows`."""

    config: _Config
    hessian: np.ndarray  # damped H
    hessian32: np.ndarray  # damped H in float32: the ranking products (see onnxq.solvers.hessian)
    upper: np.ndarray  # upper Cholesky factor of H⁻¹ in processing order
    order: np.ndarray | None

    def loss_of(self, rows: _Rows, grid: GroupGrid) -> np.ndarray:
        return ranking_loss(rows.target, grid.dequantize(self.config.group_size), self.hessian32)

    def integer(self, rows: _Rows, grid: GroupGrid) -> tuple[GroupGrid, np.ndarray]:
        """Re-round all codes on ``grid``: GPTQ (loss for free) or relaxed rounding."""
        config = self.config
        if config.round_mode == "train":
            codes = relaxed_rounding(rows.target, self.hessian, grid, config.group_size, config.bits, rows.mask,
                                     self.order, config.train_stages, config.train_steps)
            candidate = grid.with_codes(codes)
            return candidate, self.loss_of(rows, candidate)
        codes, candidate_loss = gptq_round(rows.target, self.upper, config.bits, config.group_size, grid.scales,
                                           grid.zero_points, grid.float_zeros, order=self.order, zero_mask=rows.mask,
                                           float32_propagation=True)
        return grid.with_codes(codes), candidate_loss

    def refine(self, rows: _Rows, grid: GroupGrid, grid_loss: np.ndarray) -> tuple[GroupGrid, np.ndarray]:
        """Coordinate descent over single codes from ``grid`` (its loss change is that of the ranking loss)."""
        config = self.config
        codes, change = coordinate_descent(rows.target, self.hessian, grid, config.group_size, config.bits,
                                           rows.mask, config.refine_sweeps, hessian32=self.hessian32)
        return grid.with_codes(codes), grid_loss + change

    def float(self, rows: _Rows, grid: GroupGrid) -> tuple[GroupGrid, np.ndarray, np.ndarray]:
        """Least-squares ``(s, z)`` for the grid's codes, rounded to their storage type; the losses of that ``θ``
        and of the current one, by the same formula (compare like with like)."""
        config = self.config
        k = grid.codes.shape[1]
        ints = grid.codes.astype(np.float64) - expand_groups(grid.zero_points, k, config.group_size)
        float_zeros = None if config.integer_zero else grid.float_zeros
        scales, float_zeros, candidate_loss, current_loss = rows.least_squares.fit(ints, grid.scales, float_zeros,
                                                                                   _storage(config))
        return GroupGrid(grid.codes, scales, grid.zero_points, float_zeros), candidate_loss, current_loss


def _accept(
    best: GroupGrid,
    best_loss: np.ndarray,
    candidate: GroupGrid,
    candidate_loss: np.ndarray,
    reference_loss: np.ndarray | None = None,
) -> np.ndarray:
    """Take the candidate's rows where its loss is lower (and lower than ``reference_loss``, if given)."""
    better = candidate_loss < best_loss
    if reference_loss is not None:  # the float step evaluates both θ with one formula: compare like with like
        better &= candidate_loss < reference_loss
    best.take(better, candidate)
    best_loss[better] = candidate_loss[better]
    return better


def _rtn_grid(target: np.ndarray, mask: np.ndarray | None, config: _Config) -> GroupGrid:
    """Min/max grid (float zero; integer zero with a mask), codes by rounding."""
    convention = "integer" if config.integer_zero else "float"
    rtn = quantize_rtn(target, config.bits, config.group_size, zero_convention=convention,
                       scale_dtype=config.param_dtype)
    scales = rtn.scales.astype(np.float64)
    zero_points = rtn.zero_points.astype(np.float64)
    float_zeros = np.zeros_like(scales) if rtn.float_zeros is None else rtn.float_zeros.astype(np.float64)
    grid = GroupGrid(np.empty(target.shape, dtype=np.uint8), scales, zero_points, float_zeros)
    grid.codes = _rtn_codes(target, grid, config, mask)
    return grid


def _rtn_codes(target: np.ndarray, grid: GroupGrid, config: _Config, mask: np.ndarray | None) -> np.ndarray:
    """Nearest codes on ``grid``'s parameters."""
    scales, zero_points, float_zeros = grid.expanded(config.group_size)
    return nearest_codes(target, safe_inverse(scales), zero_points, float_zeros, config.bits, mask).astype(np.uint8)


def _grid_search(
    target: np.ndarray,
    mask: np.ndarray | None,
    config: _Config,
    hessian32: np.ndarray,
    start: GroupGrid,
    start_loss: np.ndarray,
) -> GroupGrid:
    """The min/max grid shrunk by the ``p ∈ [min_shrink, 1]`` of least ``ℓ`` (codes by rounding), per channel.

    ``start`` is the ``p = 1`` grid with its loss.  Shrinking the range scales ``s`` and ``z`` by ``p`` (an integer
    zero-point stays put).  ``ℓ`` is the ranking loss (float32 products).
    """
    best = start.with_codes(start.codes.copy())
    best_loss = start_loss.copy()
    scales, zero_points, float_zeros = start.expanded(config.group_size)
    inverse_scales = safe_inverse(scales)
    storage = _storage(config)
    for shrink in np.linspace(1.0, config.min_shrink, config.grid_points)[1:]:
        candidate = GroupGrid(
            start.codes,
            (start.scales * shrink).astype(storage).astype(np.float64),
            start.zero_points,
            (start.float_zeros * shrink).astype(storage).astype(np.float64),
        )
        codes = nearest_codes(target, inverse_scales / shrink, zero_points, float_zeros * shrink, config.bits, mask)
        candidate_loss = ranking_loss(target, shrink * (scales * (codes - zero_points) + float_zeros), hessian32)
        better = candidate_loss < best_loss
        if np.any(better):
            candidate.codes = codes.astype(np.uint8)
            best.take(better, candidate)
            best_loss[better] = candidate_loss[better]
    best.codes = _rtn_codes(target, best, config, mask)  # the exact codes of the stored parameters
    return best


def _storage(config: _Config) -> np.dtype:
    """The type ``s`` and ``z`` are stored in: ``param_dtype`` when narrower than float32 (the alternation then works
    on the stored grid), else float32."""
    return config.param_dtype if config.param_dtype.itemsize < 4 else np.dtype(np.float32)
