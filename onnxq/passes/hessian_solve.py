"""Glue between the quantize pass and the Hessian solvers (GPTQ, decoupleQ): one weight at a time.

A grouped Conv has one Hessian per conv group (``H[g]``); its output channels ``g·N/G … (g+1)·N/G``
are solved against ``H[g]`` and the pieces stacked back along N.
"""

from __future__ import annotations

import numpy as np

from onnxq.calibration.keys import hessian_key
from onnxq.ir.targets import Target
from onnxq.quantized_weight import QuantizedWeight
from onnxq.solvers.decoupleq import quantize_decoupleq
from onnxq.solvers.gptq import quantize_gptq
from onnxq.solvers.hessian import PreparedHessian, float_output_target, layer_loss, prepare_hessian
from onnxq.solvers.rtn import quantize_rtn


class HessianStore:
    """Hessians by key, each damped and factorised once and shared by the layers that read it."""

    def __init__(self, hessians: dict, damp: float, act_order: bool) -> None:
        self.raw = hessians
        self.crosses: dict = {}  # C = Σ xᵀx_float per key (sequential mode with float targets)
        self.damp = damp
        self.act_order = act_order  # the column order the solver factorises for
        self.prepared: dict[tuple, PreparedHessian] = {}

    def get(self, target: Target, conv_group: int | None = None) -> PreparedHessian:
        key = hessian_key(target)
        slot = (key, conv_group)
        if slot not in self.prepared:
            h = self.raw[key] if conv_group is None else self.raw[key][conv_group]
            self.prepared[slot] = prepare_hessian(h, self.damp, act_order=self.act_order)
        return self.prepared[slot]

    def cross(self, target: Target, conv_group: int | None = None) -> np.ndarray | None:
        c = self.crosses.get(hessian_key(target))
        return c if c is None or conv_group is None else c[conv_group]

    def update(self, hessians: dict, crosses: dict | None = None) -> None:
        """New statistics (sequential mode): forget the factorisations of the keys that changed."""
        self.raw.update(hessians)
        self.crosses.update(crosses or {})
        self.prepared = {slot: p for slot, p in self.prepared.items() if slot[0] not in hessians}


def solve_with_hessian(
    weight: np.ndarray,
    target: Target,
    config,
    store: HessianStore,
    zero_mask: np.ndarray | None,
    group_size: int,
    zero_convention: str,
    scale_dtype: type = np.float32,
) -> tuple[QuantizedWeight, tuple[float, float]]:
    """Solve ``weight[N, K]`` with GPTQ or decoupleQ; returns it and the H-weighted losses (RTN, method).

    With float targets (the store holds ``C``) the solvers fit :func:`float_output_target`'s ``W̃``, and both
    losses are measured against it (RTN still rounds ``W``)."""
    groups = target.groups
    rows = weight.shape[0] // groups
    pieces, loss_rtn, loss_method = [], 0.0, 0.0
    for g in range(groups):
        part = slice(g * rows, (g + 1) * rows)
        hessian = store.get(target, g if groups > 1 else None)
        cross = store.cross(target, g if groups > 1 else None)
        original = weight[part]
        w = original if cross is None else float_output_target(original, hessian, cross)
        mask = None if zero_mask is None else zero_mask[part]
        if config.method == "gptq":
            qw = quantize_gptq(w, hessian, config.bits, group_size, config.symmetric, zero_convention, config.damp,
                               config.act_order, zero_mask=mask, scale_dtype=scale_dtype)
        else:
            qw, _ = quantize_decoupleq(w, hessian, config.bits, group_size, iters=config.iters, damp=config.damp,
                                       round_mode=config.round_mode, zero_mask=mask)
        raw_h = hessian.undamped()
        rtn = quantize_rtn(original, config.bits, group_size, config.symmetric,
                           "integer" if mask is not None else zero_convention, scale_dtype=scale_dtype)
        loss_rtn += float(layer_loss(w, rtn.dequantize(np.float64), raw_h).sum())
        loss_method += float(layer_loss(w, qw.dequantize(np.float64), raw_h).sum())
        pieces.append(qw)
    return stack_rows(pieces), (loss_rtn, loss_method)


def stack_rows(pieces: list[QuantizedWeight]) -> QuantizedWeight:
    """Concatenate quantized weights along N (same bits and group size)."""
    if len(pieces) == 1:
        return pieces[0]
    offsets = None
    if any(p.offsets is not None for p in pieces):
        offsets = np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in pieces])
    return QuantizedWeight(np.concatenate([p.codes for p in pieces]), np.concatenate([p.scales for p in pieces]),
                           np.concatenate([p.zero_points for p in pieces]), offsets, pieces[0].bits,
                           pieces[0].group_size)
