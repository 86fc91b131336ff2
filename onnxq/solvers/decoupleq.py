"""decoupleQ: a layer's quantization as constrained least squares, solved by alternating integer and float steps.

Per output channel (a row ``w`` of ``W[N, K]``) and with the damped layer Hessian ``H`` (see
:mod:`onnxq.solvers.hessian`), minimise ``ℓ(q) = (w − q) H (w − q)ᵀ`` over ``q_k = s_g·a_k + z_g`` (``g`` the group
of column ``k``), where the integers ``a_k ∈ [−2^(b−1), 2^(b−1)−1]`` and the floats ``(s_g, z_g)`` are decoupled:

* **initialisation**: min/max RTN grid, then a GPTQ rounding pass on that grid; keep per channel the better one;
  optionally (``grid_search``) the range is shrunk by ``p ∈ [min_shrink, 1]`` (best ``p`` per channel under ``ℓ``),
  the float step is applied to those codes and GPTQ re-rounds on the resulting grid;
* **float step** (``a`` fixed): ``ℓ`` is quadratic in ``θ = (s_1…s_G, z_1…z_G)``: with ``A = [a∘E | E]`` (``E`` the
  ``K×G`` group indicator), ``AᵀHA·θ = AᵀH·w``, a ``2G×2G`` system per channel, solved in float64 for all channels
  at once (``AᵀHA`` from ``G`` BLAS products ``a_g·H[g, :]``; a tiny Levenberg–Marquardt ridge toward the current
  ``θ`` keeps unidentifiable parameters, e.g. of a constant group, where they are);
* **integer step** (``s, z`` fixed): GPTQ rounding on the channel's grid (column sweep with error propagation through
  the Cholesky factor of ``H⁻¹``, act-order by default), or ``round_mode="train"``: projected gradient descent
  (FISTA) on the box-relaxed ``q ∈ [s·a_min + z, s·a_max + z]``, rounding the columns progressively in stages
  and re-optimising the columns still free;
* every candidate is accepted per channel only where ``ℓ`` drops, so the loss never increases; the alternation
  stops after ``iters`` rounds or when fewer than ``min_improved_fraction`` of the channels improve.

Storage (float zero convention): ``codes = a + 2^(b−1)``, ``zero_points = 2^(b−1)``, ``offsets = z``.  With a
``zero_mask`` (SplitQuant branches) the integer zero-point convention is used instead — ``q = s_g·(c − zp_g)``,
``zp_g`` an integer fixed by the (grid) min/max fit, masked entries get ``c = zp_g`` and dequantize to exactly 0 —
and the float step solves only ``s``.  Channels are processed in chunks of ``max_rows`` (they are independent).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg

from onnxq.errors import OnnxqError
from onnxq.quantized_weight import QuantizedWeight, expand_groups, num_groups
from onnxq.solvers.gptq import _check_hessian, _check_mask, _check_weight, _safe_inverse, gptq_round
from onnxq.solvers.grouping import resolve_group_size
from onnxq.solvers.hessian import PreparedHessian, layer_loss, prepare_hessian
from onnxq.solvers.rtn import quantize_rtn

RoundMode = Literal["gptq", "train"]
RIDGE = 1e-10  # relative Levenberg–Marquardt ridge of the float step
HA_BUDGET = 1 << 23  # float64 elements of the [rows, K, G] product in the float step (64 MiB)

__all__ = ["quantize_decoupleq", "layer_loss", "fit_float_params"]


@dataclass
class _Grid:
    """Per-channel state: codes ``[n, K]`` and float64 group parameters ``[n, G]``."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    offsets: np.ndarray

    def take(self, better: np.ndarray, other: _Grid) -> None:
        for name in ("codes", "scales", "zero_points", "offsets"):
            getattr(self, name)[better] = getattr(other, name)[better]


@dataclass(frozen=True)
class _Config:
    bits: int
    group_size: int
    integer_zero: bool  # masked mode: q = s·(c − zp), no offsets
    iters: int
    round_mode: RoundMode
    grid_search: bool
    grid_points: int
    min_shrink: float
    act_order: bool
    min_improved_fraction: float
    train_stages: int
    train_steps: int


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
    grid_points: int = 12,
    min_shrink: float = 0.6,
    min_improved_fraction: float = 1e-3,
    train_stages: int = 8,
    train_steps: int = 25,
    max_rows: int = 4096,
) -> tuple[QuantizedWeight, dict]:
    """Solve ``min (w − q) H (w − q)ᵀ``, ``q = s·a + z`` per channel/group, by alternating integer and float steps.

    Returns the ``QuantizedWeight`` and stats: ``loss_rtn``, ``loss_init``, ``loss_final`` (sums over channels of
    the damped objective), ``losses`` and ``improved`` (per iteration), ``raw_loss_rtn``/``raw_loss_final``
    (undamped ``H``), ``damp`` (λ used), ``iterations`` and ``seconds``.
    """
    start = time.perf_counter()
    weight = _check_weight(weight, bits)
    n, k = weight.shape
    if round_mode not in ("gptq", "train"):
        raise OnnxqError(f"round_mode must be 'gptq' or 'train', got {round_mode!r}")
    if iters < 0:
        raise OnnxqError(f"iters must be >= 0, got {iters}")
    group_size = resolve_group_size(k, group_size)
    prepared = prepare_hessian(hessian, damp)
    _check_hessian(prepared, k)
    mask = _check_mask(zero_mask, weight.shape)
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
        min_improved_fraction=float(min_improved_fraction),
        train_stages=max(1, int(train_stages)),
        train_steps=max(1, int(train_steps)),
    )
    groups = num_groups(k, group_size)
    result = _Grid(
        codes=np.empty((n, k), dtype=np.uint8),
        scales=np.empty((n, groups)),
        zero_points=np.empty((n, groups)),
        offsets=np.zeros((n, groups)),
    )
    chunk_stats = []
    rows = max(1, int(max_rows))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        grid, stats = _solve_rows(target[r0:r1], None if mask is None else mask[r0:r1], prepared, config, log)
        for name in ("codes", "scales", "zero_points", "offsets"):
            getattr(result, name)[r0:r1] = getattr(grid, name)
        chunk_stats.append(stats)

    qweight = QuantizedWeight(
        codes=result.codes,
        scales=result.scales.astype(np.float32),
        zero_points=result.zero_points.astype(np.uint8),
        offsets=None if config.integer_zero else result.offsets.astype(np.float32),
        bits=bits,
        group_size=group_size,
    )
    raw_hessian = prepared.undamped()
    stats = _merge_stats(chunk_stats)
    stats["raw_loss_rtn"] = float(np.sum(layer_loss(target, _rtn(target, mask, config, 1.0)[1], raw_hessian)))
    stats["raw_loss_final"] = float(np.sum(layer_loss(target, qweight.dequantize(np.float64), raw_hessian)))
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
) -> tuple[_Grid, dict]:
    """The whole alternation for a chunk of channels (rows are independent)."""
    hessian = prepared.damped
    order = prepared.act_order() if config.act_order else None
    upper = prepared.inverse_cholesky_upper(order)

    def loss_of(grid: _Grid) -> np.ndarray:
        return layer_loss(target, _dequantize(grid, config.group_size), hessian)

    def integer_step(grid: _Grid) -> _Grid:
        if config.round_mode == "train":
            codes = _round_train(target, grid, hessian, mask, config, order)
        else:
            codes = gptq_round(
                target,
                upper,
                config.bits,
                config.group_size,
                grid.scales,
                grid.zero_points,
                grid.offsets,
                order=order,
                zero_mask=mask,
            )
        return _Grid(codes, grid.scales.copy(), grid.zero_points.copy(), grid.offsets.copy())

    def float_step(grid: _Grid) -> _Grid:
        ints = grid.codes.astype(np.float64) - expand_groups(grid.zero_points, target.shape[1], config.group_size)
        scales, offsets = fit_float_params(
            target, ints, hessian, config.group_size, grid.scales, None if config.integer_zero else grid.offsets
        )
        return _Grid(grid.codes.copy(), scales, grid.zero_points.copy(), offsets)

    def accept(best: _Grid, best_loss: np.ndarray, candidate: _Grid) -> np.ndarray:
        candidate_loss = loss_of(candidate)
        better = candidate_loss < best_loss
        best.take(better, candidate)
        best_loss[better] = candidate_loss[better]
        return better

    best, _ = _rtn(target, mask, config, 1.0)
    loss = loss_of(best)
    stats: dict = {"loss_rtn": float(loss.sum())}
    accept(best, loss, integer_step(best))
    if config.grid_search:
        grid = _grid_search(target, mask, config, hessian, loss_of)
        accept(best, loss, grid)
        fitted = float_step(grid)
        accept(best, loss, fitted)
        accept(best, loss, integer_step(fitted))
    stats["loss_init"] = float(loss.sum())

    losses, improved = [], []
    for _ in range(config.iters):
        changed = accept(best, loss, float_step(best))
        changed |= accept(best, loss, integer_step(best))
        losses.append(float(loss.sum()))
        improved.append(int(changed.sum()))
        if improved[-1] <= config.min_improved_fraction * target.shape[0]:
            break
    stats.update(losses=losses, improved=improved, loss_final=float(loss.sum()))
    return best, stats


def fit_float_params(
    target: np.ndarray,
    ints: np.ndarray,
    hessian: np.ndarray,
    group_size: int,
    scales: np.ndarray,
    offsets: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``(s, z)`` per channel/group for fixed integers ``a``: ``AᵀHA·θ = AᵀH·w`` per row.

    ``A = [a∘E | E]`` with ``E`` the ``K×G`` group indicator (only ``a∘E`` when ``offsets`` is None: ``z = 0``).
    ``scales``/``offsets`` (``[n, G]``) are the current values: the ridge pulls unidentifiable parameters toward
    them.  Returns float64 arrays holding float32-representable values (as they will be stored).
    """
    n, k = target.shape
    groups = scales.shape[1]
    padded = groups * group_size
    with_offsets = offsets is not None
    h_pad = np.zeros((padded, padded))
    h_pad[:k, :k] = hessian
    a_pad = np.zeros((n, padded))
    a_pad[:, :k] = ints
    hw_pad = np.zeros((n, padded))
    hw_pad[:, :k] = target @ hessian
    a3 = a_pad.reshape(n, groups, group_size)
    rhs_scale = np.einsum("ngj,ngj->ng", a3, hw_pad.reshape(n, groups, group_size))
    if with_offsets:
        h_group_sums = h_pad.reshape(padded, groups, group_size).sum(axis=2)  # [padded, G]: Σ_{l∈h} H_kl
        m22 = h_group_sums.reshape(groups, group_size, groups).sum(axis=1)  # [G, G]
        rhs = np.concatenate([rhs_scale, hw_pad.reshape(n, groups, group_size).sum(axis=2)], axis=1)
        theta0 = np.concatenate([scales, offsets], axis=1)
    else:
        rhs = rhs_scale
        theta0 = scales.astype(np.float64)
    size = rhs.shape[1]
    theta = np.empty((n, size))
    rows = max(1, HA_BUDGET // (padded * groups))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        m = r1 - r0
        ha = np.empty((m, padded, groups))  # ha[n, k, h] = Σ_{l∈h} H_kl a_nl
        for h in range(groups):
            cols = slice(h * group_size, (h + 1) * group_size)
            ha[:, :, h] = a_pad[r0:r1, cols] @ h_pad[cols, :]
        system = np.empty((m, size, size))
        system[:, :groups, :groups] = np.matmul(
            a3[r0:r1, :, None, :], ha.reshape(m, groups, group_size, groups)
        ).reshape(m, groups, groups)
        if with_offsets:
            m12 = np.einsum("ngj,gjh->ngh", a3[r0:r1], h_group_sums.reshape(groups, group_size, groups))
            system[:, :groups, groups:] = m12
            system[:, groups:, :groups] = m12.transpose(0, 2, 1)
            system[:, groups:, groups:] = m22
        system = 0.5 * (system + system.transpose(0, 2, 1))
        diag = np.diagonal(system, axis1=1, axis2=2)
        floor = np.maximum(diag.mean(axis=1, keepdims=True), 1e-300) * 1e-6
        ridge = RIDGE * np.maximum(diag, floor)
        system[:, np.arange(size), np.arange(size)] += ridge
        theta[r0:r1] = np.linalg.solve(system, (rhs[r0:r1] + ridge * theta0[r0:r1])[..., None])[..., 0]
    theta = theta.astype(np.float32).astype(np.float64)
    bad = ~np.all(np.isfinite(theta), axis=1)
    theta[bad] = theta0[bad]
    if with_offsets:
        return theta[:, :groups], theta[:, groups:]
    return theta, np.zeros_like(theta)


def _rtn(target: np.ndarray, mask: np.ndarray | None, config: _Config, shrink: float) -> tuple[_Grid, np.ndarray]:
    """Min/max grid of the range shrunk by ``shrink`` (float zero, or integer zero with a mask); codes by rounding.

    Returns the grid and its dequantized weight.
    """
    convention = "integer" if config.integer_zero else "float"
    rtn = quantize_rtn(target * shrink, config.bits, config.group_size, zero_convention=convention)
    scales = rtn.scales.astype(np.float64)
    zero_points = rtn.zero_points.astype(np.float64)
    offsets = np.zeros_like(scales) if rtn.offsets is None else rtn.offsets.astype(np.float64)
    grid = _Grid(np.empty(target.shape, dtype=np.uint8), scales, zero_points, offsets)
    grid.codes[...] = _round_to_grid(target, grid, config, mask)
    return grid, _dequantize(grid, config.group_size)


def _round_to_grid(target: np.ndarray, grid: _Grid, config: _Config, mask: np.ndarray | None) -> np.ndarray:
    """Nearest codes of ``target`` on the grid (group parameters expanded to ``[n, K]``)."""
    k = target.shape[1]
    return _nearest_codes(
        target,
        expand_groups(_safe_inverse(grid.scales), k, config.group_size),
        expand_groups(grid.zero_points, k, config.group_size),
        expand_groups(grid.offsets, k, config.group_size),
        config.bits,
        mask,
    )


def _nearest_codes(
    values: np.ndarray,
    inverse_scales: np.ndarray,
    zero_points: np.ndarray,
    offsets: np.ndarray,
    bits: int,
    mask: np.ndarray | None,
) -> np.ndarray:
    """``clip(round((w − z)/s) + zp, 0, 2^b − 1)`` elementwise; masked entries get ``zp``."""
    codes = np.clip(np.round((values - offsets) * inverse_scales) + zero_points, 0, (1 << bits) - 1)
    if mask is not None:
        codes = np.where(mask, zero_points, codes)
    return codes.astype(np.uint8)


def _dequantize(grid: _Grid, group_size: int) -> np.ndarray:
    k = grid.codes.shape[1]
    return expand_groups(grid.scales, k, group_size) * (
        grid.codes - expand_groups(grid.zero_points, k, group_size)
    ) + expand_groups(grid.offsets, k, group_size)


def _grid_search(
    target: np.ndarray,
    mask: np.ndarray | None,
    config: _Config,
    hessian: np.ndarray,
    loss_of: Callable[[_Grid], np.ndarray],
) -> _Grid:
    """The RTN grid whose range is shrunk by the ``p ∈ [min_shrink, 1]`` of least ``ℓ``, per channel."""
    best, _ = _rtn(target, mask, config, 1.0)
    best_loss = loss_of(best)
    for shrink in np.linspace(1.0, config.min_shrink, config.grid_points)[1:]:
        candidate, _ = _rtn(target, mask, config, float(shrink))
        candidate_loss = loss_of(candidate)
        better = candidate_loss < best_loss
        best.take(better, candidate)
        best_loss[better] = candidate_loss[better]
    return best


def _round_train(
    target: np.ndarray,
    grid: _Grid,
    hessian: np.ndarray,
    mask: np.ndarray | None,
    config: _Config,
    order: np.ndarray | None,
) -> np.ndarray:
    """Projected gradient (FISTA) on the box-relaxed weights, rounding the columns progressively in stages."""
    n, k = target.shape
    levels = (1 << config.bits) - 1
    scales = expand_groups(grid.scales, k, config.group_size)
    zero_points = expand_groups(grid.zero_points, k, config.group_size)
    offsets = expand_groups(grid.offsets, k, config.group_size)
    low = scales * (0 - zero_points) + offsets
    high = scales * (levels - zero_points) + offsets
    low, high = np.minimum(low, high), np.maximum(low, high)
    if mask is not None:
        low = np.where(mask, 0.0, low)
        high = np.where(mask, 0.0, high)
    relaxed = np.clip(target, low, high)
    step = 1.0 / scipy.linalg.eigvalsh(hessian, subset_by_index=[k - 1, k - 1])[0]
    order = np.arange(k) if order is None else order
    fixed = np.zeros(k, dtype=bool)
    inverse = _safe_inverse(scales)

    def snap(cols: np.ndarray) -> None:
        codes = _nearest_codes(
            relaxed[:, cols],
            inverse[:, cols],
            zero_points[:, cols],
            offsets[:, cols],
            config.bits,
            None if mask is None else mask[:, cols],
        )
        relaxed[:, cols] = scales[:, cols] * (codes - zero_points[:, cols]) + offsets[:, cols]

    for stage_cols in np.array_split(order, config.train_stages):
        free = np.flatnonzero(~fixed)
        h_free = hessian[np.ix_(free, free)]
        # gradient of ℓ w.r.t. the free columns: (x − w) H[:, free]; the fixed part is constant in this stage
        base = (relaxed[:, fixed] - target[:, fixed]) @ hessian[np.ix_(fixed, free)]
        x = relaxed[:, free]
        y, momentum = x.copy(), 1.0
        lo, hi, w_free = low[:, free], high[:, free], target[:, free]
        for _ in range(config.train_steps):
            x_next = np.clip(y - step * (base + (y - w_free) @ h_free), lo, hi)
            momentum_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * momentum * momentum))
            y = x_next + ((momentum - 1.0) / momentum_next) * (x_next - x)
            x, momentum = x_next, momentum_next
        relaxed[:, free] = x
        snap(stage_cols)
        fixed[stage_cols] = True
    return _nearest_codes(relaxed, inverse, zero_points, offsets, config.bits, mask)


def _merge_stats(chunks: list[dict]) -> dict:
    """Sum the per-chunk losses; a chunk that stopped early keeps its last loss in later iterations."""
    length = max(len(c["losses"]) for c in chunks)
    losses = [0.0] * length
    improved = [0] * length
    for c in chunks:
        padded = c["losses"] + [c["loss_final"]] * (length - len(c["losses"]))
        counts = c["improved"] + [0] * (length - len(c["improved"]))
        losses = [a + b for a, b in zip(losses, padded, strict=True)]
        improved = [a + b for a, b in zip(improved, counts, strict=True)]
    return {
        "loss_rtn": sum(c["loss_rtn"] for c in chunks),
        "loss_init": sum(c["loss_init"] for c in chunks),
        "loss_final": sum(c["loss_final"] for c in chunks),
        "losses": losses,
        "improved": improved,
        "iterations": length,
    }
