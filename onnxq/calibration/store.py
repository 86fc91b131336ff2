"""Hessians by key, each damped and factorised once and handed to the layers that read it as :class:`LayerStats`."""

from __future__ import annotations

import numpy as np

from onnxq.calibration.keys import HessianKey, hessian_key
from onnxq.ir.targets import Target
from onnxq.solvers.base import LayerStats
from onnxq.solvers.hessian import PreparedHessian, prepare_hessian


class HessianStore:
    """``H`` (and, with float targets, ``C = Σ xᵀx_float``) per Hessian key; a grouped Conv's entry holds one
    matrix per conv group (``[C, K, K]``)."""

    def __init__(self, damp: float, act_order: bool) -> None:
        self.hessians: dict[HessianKey, np.ndarray] = {}
        self.crosses: dict[HessianKey, np.ndarray] = {}
        self.damp = damp
        self.act_order = act_order  # the column order the solver factorises for
        self.prepared: dict[tuple[HessianKey, int], PreparedHessian] = {}

    def update(self, hessians: dict, crosses: dict | None = None) -> None:
        """New statistics: forget the factorisations of the keys that changed."""
        self.hessians.update(hessians)
        self.crosses.update(crosses or {})
        self.prepared = {slot: p for slot, p in self.prepared.items() if slot[0] not in hessians}

    def forget(self, keys: set[HessianKey]) -> None:
        """Drop the statistics of ``keys`` (solved, and read by no layer still to solve): a sequential run holds
        one layer group's ``H``, ``C`` and factorisations at a time, not the whole model's."""
        for key in keys:
            self.hessians.pop(key, None)
            self.crosses.pop(key, None)
        self.prepared = {slot: p for slot, p in self.prepared.items() if slot[0] not in keys}

    def layer_stats(self, target: Target) -> LayerStats:
        """The statistics of ``target``'s input, one entry per conv group."""
        key = hessian_key(target)
        conv_groups = target.conv_groups
        cross = self.crosses.get(key)
        if any((key, c) not in self.prepared for c in range(conv_groups)):
            hessian = self.hessians.pop(key)  # once damped and factorised, the raw sum is not needed (K × K less)
            for c in range(conv_groups):
                h = hessian if conv_groups == 1 else hessian[c]
                self.prepared[(key, c)] = prepare_hessian(h, self.damp, act_order=self.act_order)
            del hessian, h
        prepared = [self.prepared[(key, c)] for c in range(conv_groups)]
        crosses = [None if cross is None else (cross if conv_groups == 1 else cross[c]) for c in range(conv_groups)]
        return LayerStats(tuple(prepared), tuple(crosses))
